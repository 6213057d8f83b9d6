"""The hard region of MicroSegNet and micro-US adaptive focal: expert XOR non-expert, dilated by a k x k rectangle.

Computed on the masks' own device (shifted maxima, see `dilate`). The dilation reproduces OpenCV's
`cv2.dilate(xor, np.ones((k, k)))` exactly: the kernel is anchored at k // 2, so a foreground
pixel grows by (k - 1) // 2 pixels up/left and k // 2 pixels down/right (asymmetric for even
k; k = 1 is the identity); pixels outside the image count as background. With
`spatial_dims=3` the same anchor rule dilates by a k x k x k box (no OpenCV counterpart).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from microseg.core.errors import MicrosegError
from microseg.core.rules import KERNEL, check_option


def check_kernel_size(kernel_size: int) -> int:
    """The dilation kernel size as an int >= 1 (the `KERNEL` rule), else MicrosegError."""
    return check_option("dilation", "kernel_size", kernel_size, KERNEL)


def dilate(mask: Tensor, kernel_size: int, spatial_dims: int = 2) -> Tensor:
    """Binary dilation of the last `spatial_dims` axes of a {0,1} mask (any dtype), OpenCV anchor.

    The k x k box is separable: a running maximum over k shifted views along each axis in turn
    (output[x] = max input[x - k // 2 .. x + (k - 1) // 2], zero padding); on a uint8 mask this is
    cheaper than max pooling on both CPU and GPU.
    """
    kernel_size = check_kernel_size(kernel_size)
    if kernel_size == 1:
        return mask
    if spatial_dims not in (2, 3) or mask.ndim < spatial_dims:
        raise MicrosegError(f"cannot dilate a mask of shape {tuple(mask.shape)} over {spatial_dims} axes")
    before, after = kernel_size // 2, (kernel_size - 1) // 2
    for from_end in range(spatial_dims):
        axis, length = mask.ndim - 1 - from_end, mask.shape[mask.ndim - 1 - from_end]
        padded = F.pad(mask, (0, 0) * from_end + (before, after))
        mask = padded.narrow(axis, 0, length)
        for shift in range(1, kernel_size):
            mask = torch.maximum(mask, padded.narrow(axis, shift, length))
    return mask


def hard_region(expert: Tensor, non_expert: Tensor, kernel_size: int, spatial_dims: int = 2) -> Tensor:
    """dilate(expert XOR non_expert, k): 1 where the two annotations disagree (plus a margin), else 0.

    Masks are binarised at 0.5; the result has `expert`'s shape and dtype (float32 for integer masks).
    """
    if expert.shape != non_expert.shape:
        raise MicrosegError(
            f"expert mask shape {tuple(expert.shape)} does not match non-expert shape {tuple(non_expert.shape)}"
        )
    dtype = expert.dtype if expert.is_floating_point() else torch.float32
    disagree = ((expert > 0.5) ^ (non_expert > 0.5)).to(torch.uint8)
    return dilate(disagree, kernel_size, spatial_dims).to(dtype)
