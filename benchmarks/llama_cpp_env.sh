#!/usr/bin/env bash
# A virtual environment with llama-cpp-python (it builds llama.cpp from source: 40 minutes or more on 2 cores) for
# the real llama.cpp checks of GGUF adapters (tests/test_gguf.py -k llama_cpp: exact on an F32 copy of the base,
# within rounding on the Q4_1 file).
# It is kept apart from the project's environment; the test finds it at ${PEFTKIT_CACHE:-~/.cache/peftkit}/llama-cpp
# (or wherever PEFTKIT_LLAMA_CPP_PYTHON points). A wheel already built elsewhere: WHEEL=path/to/llama_cpp_python-*.whl.
#
#     bash benchmarks/llama_cpp_env.sh
set -euo pipefail
ENV_DIR="${PEFTKIT_CACHE:-$HOME/.cache/peftkit}/llama-cpp"
python3 -m venv "$ENV_DIR"
if [ -n "${WHEEL:-}" ]; then
    "$ENV_DIR/bin/pip" install "$WHEEL"
else
    # Only the library: no server, tools, examples or tests; CPU only.
    CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" nice -n 10 "$ENV_DIR/bin/pip" install llama-cpp-python
fi
"$ENV_DIR/bin/pip" install numpy
"$ENV_DIR/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'in', '$ENV_DIR')"
