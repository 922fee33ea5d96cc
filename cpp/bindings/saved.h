// What a backward needs from its forward: the plan, the input, the statistics, the weight.
// A C++ class so that forward_fast can return one without a Python constructor call, and with
// the statistics in C++ vectors, so that a small layer's call makes no NumPy arrays for them
// (each costs about 0.15 us). The Python path (_engine.apply) builds the same object.
#pragma once
#include <pybind11/pybind11.h>

#include <vector>

#include "normkit/plan.h"

namespace nkpy {

struct Saved {
  nk::Plan plan;
  pybind11::object x;
  std::vector<double> mean, rstd;  // per group
  bool has_stats = true;           // false: an empty input's Saved, mean and rstd None
  pybind11::object weight;
  bool batch_stats = true;         // statistics from x (training), or given (eval)
  pybind11::object shape;          // the output's shape; None: x's
};

void def_saved(pybind11::module_& m);

}  // namespace nkpy
