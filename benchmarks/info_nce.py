"""InfoNCE / CLIP loss: xloss against naive PyTorch (and inf_cl with ``--preset gpu``).

A thin front end of ``python -m xloss.bench`` with the family fixed and results written next to this file::

    python benchmarks/info_nce.py                          # preset "default" (CPU or CUDA)
    python benchmarks/info_nce.py --preset acceptance-cpu  # N=M=16384 D=512 and N=M=65536 D=256, fp32
    python benchmarks/info_nce.py --preset gpu             # N=M=65536 D=768 bf16, with inf_cl if installed
    python benchmarks/info_nce.py --sizes 1024,4096 --dim 256 --runs 5

Every option of ``python -m xloss.bench`` works here; ``--out`` defaults to ``benchmarks/results``.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing xloss

from xloss import bench

if __name__ == "__main__":
    # The default --out comes first so that one given on the command line wins.
    sys.exit(bench.main(["--out", str(HERE / "results"), *sys.argv[1:]], family="info_nce"))
