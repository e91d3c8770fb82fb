"""The parts of benchmarks/gpu_bench.py, which runs them: `common` (loading the model code, device,
time budget, checks, result rows), one module per section (`training`, `inference`, `dynamic`)
and `report` (the tables). Like gpu_bench.py they need nothing but PyTorch; scripts in benchmarks/
import them as `speed.*`."""
