// Launchers of the moe kernel family (include/dsmoe/moe/). Filled in by its issue.
#include "common.h"
