"""The planner (build machine; pure, no I/O): model facts + device profile + options → a plan.

``facts`` reads what a model is from its config and tensor shapes; ``quants`` knows llama.cpp's
and onnxruntime's quantization types and their sizes; ``estimate`` models memory and speed;
``planner`` chooses format, quant, context, threads and offload and says why. Nothing here
touches the network or the file system beyond what callers hand in.
"""

from edgepack._callable import make_callable

# `edgepack.NAME(...)` is the library API (edgepack.api); the package stays a package.
make_callable(__name__)
