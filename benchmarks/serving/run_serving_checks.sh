#!/usr/bin/env bash
# The serving checks of docs/serving.md: exported ALTER tasks in ONNX Runtime (through Optimum) and in llama.cpp
# (through llama-cpp-python), token for token against ALTER. Each engine gets its own virtual environment, made on the
# first run (git-ignored, in the repository root): .venv-onnx (optimum-onnx, which pins Transformers < 4.58) and
# .venv-llama (llama-cpp-python, compiled from source by pip: the build time is printed). The outputs go to
# benchmarks/results/serving/ (the recorded figures that docs/serving.md quotes).
#
#   bash benchmarks/serving/run_serving_checks.sh            # PYTHON=... for the project's interpreter
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-outputs/serving}
RESULTS=benchmarks/results/serving
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
OPTIMUM_ONNX=${OPTIMUM_ONNX:-0.1.0}
mkdir -p "$RESULTS" "$OUT"

echo "== 1. exports and ALTER's tokens ($PYTHON, the project's environment)"
"$PYTHON" benchmarks/serving/make_exports.py --out "$OUT" 2>&1 | grep -v -E "Loading weights|Writing model" \
    | tee "$RESULTS/make_exports.txt"

echo "== 2a. ONNX Runtime through Optimum (.venv-onnx)"
if [ ! -x .venv-onnx/bin/python ]; then
    python3 -m venv .venv-onnx
    .venv-onnx/bin/pip install -q torch==2.13.0
    .venv-onnx/bin/pip install -q "optimum-onnx[onnxruntime]==$OPTIMUM_ONNX"
fi
.venv-onnx/bin/python benchmarks/serving/onnx_check.py "$OUT" 2>&1 | grep -v -E "Loading weights|Writing model" \
    | tee "$RESULTS/onnx.txt"

echo "== 2b. llama.cpp through llama-cpp-python (.venv-llama)"
SDIST_DIR="$OUT/sdist"
if [ ! -f "$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" ]; then
    mkdir -p "$SDIST_DIR"
    python3 -m pip download -q --no-deps --no-binary :all: -d "$SDIST_DIR" "llama-cpp-python==$LLAMA_CPP_PYTHON"
fi
if [ ! -x .venv-llama/bin/python ] || ! .venv-llama/bin/python -c "import llama_cpp" 2>/dev/null; then
    python3 -m venv .venv-llama
    .venv-llama/bin/pip install -q torch==2.13.0
    .venv-llama/bin/pip install -q "transformers==5.25.0" sentencepiece numpy
    start=$(date +%s)
    .venv-llama/bin/pip install -q --no-binary llama-cpp-python "$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
    echo "llama-cpp-python $LLAMA_CPP_PYTHON built from source in $(( $(date +%s) - start )) s on $(nproc) cores" \
        | tee "$RESULTS/llama_cpp_build.txt"
fi
# llama.cpp's own converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py), vendored in the sdist
LLAMA_CPP_DIR="$OUT/llama.cpp-$LLAMA_CPP_PYTHON"
if [ ! -f "$LLAMA_CPP_DIR/convert_hf_to_gguf.py" ]; then
    mkdir -p "$LLAMA_CPP_DIR"
    tar xzf "$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$LLAMA_CPP_DIR" --strip-components 3 \
        "llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp/conversion" \
        "llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp/gguf-py"
fi
.venv-llama/bin/python benchmarks/serving/llama_cpp_check.py "$OUT" "$LLAMA_CPP_DIR" 2>&1 \
    | grep -v -E "Loading weights|Writing model" | tee "$RESULTS/llama_cpp.txt"
cp "$OUT"/*_results.json "$RESULTS/" 2>/dev/null || true
