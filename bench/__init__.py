"""Benchmarks: `python -m bench.run` (or `make bench`) measures, writes bench/results/*.json and
BENCHMARKS.md. One module per item of the report:

  ray_overhead   1. Ray Train against the plain loop (1 worker), and 2 workers against 1
  fashion        2. time to accuracy on Fashion-MNIST through `dvc repro` (5. memory comes with it)
  preprocess     3. preprocess throughput per core, 1 and 2 processes
  overheads      4. no-op `dvc repro`, Ray and stage start-up, end-to-end `make run`
  gpu            6. the CUDA path (fp32, bf16 autocast; channels_last), no Ray/MLflow/DVC: `python -m
                    bench.gpu` (images/s, GPU busy, peak memory, time to 0.935, 2 ranks on 1 GPU)

Benchmarks are not tests: they assert nothing about time. tests/test_bench.py runs each on tiny
sizes so the code cannot rot. Machine-wide noise (other jobs on a shared machine) is watched by
`common.Noise`: compared variants alternate, medians are reported, and a measurement during
which other processes used the CPUs is repeated.
"""
