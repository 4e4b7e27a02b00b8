"""The benchmark suite: cases, implementations, timing, metrics, tiers, results and the CLI.

Modules by job: cases (shapes and inputs), impls (the registry of adapters), timing (clocks,
flush, stopping rule), device (NVML fingerprint and clock sampling), metrics (FLOP/byte models,
peaks, error check), tiers (T1/T2/T3 rules), results (the JSON schema), runner (cases x impls),
report (tables), cli (`sparsek-bench`).
"""
