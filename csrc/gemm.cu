// Launchers of the gemm kernel family (include/dsmoe/gemm/). Filled in by its issue.
#include "common.h"
