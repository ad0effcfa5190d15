"""TVM lowerings (TensorIR scheduled by dlight, static bucket shapes): the linear family and the norms."""
