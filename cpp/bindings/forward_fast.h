// The one-call layer forward (forward_fast.cpp), registered on the module by module.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace nkpy {
void def_forward_fast(pybind11::module_& m);
}
