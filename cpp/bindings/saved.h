// What a backward needs from its forward: the plan, the input, the statistics, the weight.
// A C++ class so that forward_fast can return one without a Python constructor call; the
// Python path (_engine.apply) builds the same object.
#pragma once
#include <pybind11/pybind11.h>

#include "normkit/plan.h"

namespace nkpy {

struct Saved {
  nk::Plan plan;
  pybind11::object x, mean, rstd, weight;  // mean, rstd: float64 per group (None: empty input)
  bool batch_stats = true;                 // statistics from x (training), or given (eval)
  pybind11::object shape;                  // the output's shape; None: x's
};

void def_saved(pybind11::module_& m);

}  // namespace nkpy
