// Launchers of the ep kernel family (include/dsmoe/ep/). Filled in by its issue.
#include "common.h"
