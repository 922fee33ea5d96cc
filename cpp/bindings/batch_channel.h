// BatchChannelNorm2d's folds (batch_channel.cpp), registered on the module by module.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace nkpy {
void def_batch_channel(pybind11::module_& m);
}
