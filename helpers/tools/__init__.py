"""Tools beside the library: the demo competitions' builder, the benchmarks and the recipe
benchmark's competition. They use helpers; nothing in helpers' library code depends on them
(but `setup`, which builds the demo competition on first use)."""
