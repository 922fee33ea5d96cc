// BatchLayerNorm2d's steps and the running-statistics update (batch_layer.cpp), registered on
// the module by module.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace nkpy {
void def_batch_layer(pybind11::module_& m);
}
