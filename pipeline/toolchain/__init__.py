"""The TPU-MLIR toolchain: its own pinned Python 3.10 environment (install.py), the tools run
per piece with a log each (tools.py), and one long-lived toolchain process that keeps torch and
tpu_mlir imported between pieces and runs bmodels on the simulator for the build's checks
(process.py starts worker.py; pyruntime_backend.py runs a bmodel through it)."""
