"""Type aliases of the public API (annotations only; nothing here runs in the operators).

numpy arrays are typed with ``numpy.typing``; a cupy array passes where an array is expected at run
time but is not a ``numpy.ndarray`` to a type checker (cupy ships no type information).
"""
from typing import Any, List, Literal, Sequence, Tuple, Union

from numpy.typing import ArrayLike, NDArray

Array = NDArray[Any]
# the box gradient takes the form the boxes came in: one array, or a list of per-image arrays
BoxGrad = Union[Array, List[Array]]
# boxes: (K, 5) / (K, 4) arrays, or a sequence of per-image (L_i, 4) arrays
Boxes = Union[ArrayLike, Sequence[ArrayLike]]
OutputSize = Union[int, Tuple[int, int], Sequence[int]]
# a feature map, or only its shape (enough for the feature gradient in avg mode)
FeaturesOrShape = Union[ArrayLike, Tuple[int, int, int, int]]
Layout = Literal["NCHW", "NHWC"]
Mode = Literal["avg", "max", "onnx_max"]
Backend = Literal["auto", "cpu", "cuda"]
Wrt = Literal["features", "boxes", "both"]

__all__ = ["Array", "ArrayLike", "BoxGrad", "Boxes", "OutputSize", "FeaturesOrShape", "Layout",
           "Mode", "Backend", "Wrt"]
