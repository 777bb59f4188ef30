// Launchers of the mla kernel family (include/dsmoe/mla/). Filled in by its issue.
#include "common.h"
