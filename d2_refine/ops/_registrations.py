"""Fake (meta) kernels and autograd of the compiled ops, registered only when ``d2_refine._C`` loaded (the schemas
come from the library; registering against a missing op would fail at import)."""
import torch

from ._library import has_ops

__all__ = []


def _register():
    lib = "d2_refine"

    def _no_double_backward_setup(ctx, inputs, output):
        pass

    def _no_double_backward(ctx, *grads):
        raise RuntimeError("prroi_pool does not support double backward (second derivatives)")

    @torch.library.register_fake(f"{lib}::prroi_pool")
    def _prroi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width, aligned):
        torch._check(input.dim() == 4, lambda: f"prroi_pool: input must be Tensor[N, C, H, W], got {input.shape}")
        torch._check(rois.dim() == 2 and rois.size(1) == 5,
                     lambda: f"prroi_pool: rois must be Tensor[K, 5], got {rois.shape}")
        torch._check(rois.dtype == input.dtype, lambda: "prroi_pool: rois must have the dtype of input")
        return input.new_empty((rois.size(0), input.size(1), pooled_height, pooled_width))

    @torch.library.register_fake(f"{lib}::_prroi_pool_backward")
    def _prroi_pool_backward_fake(grad, input, rois, spatial_scale, pooled_height, pooled_width, aligned,
                                  input_requires_grad, rois_requires_grad):
        torch._check(grad.dim() == 4 and grad.size(0) == rois.size(0) and grad.size(1) == input.size(1),
                     lambda: "_prroi_pool_backward: grad must be Tensor[K, C, PH, PW]")
        return input.new_empty(input.shape), rois.new_empty(rois.shape)

    def _check_nms_args(boxes, scores, ious, idxs):
        torch._check(boxes.dim() == 2 and boxes.size(1) == 4, lambda: "iou_guided_nms: boxes must be Tensor[N, 4]")
        torch._check(scores.dim() == 1 and ious.dim() == 1 and idxs.dim() == 1,
                     lambda: "iou_guided_nms: scores, ious and idxs must be 1-D")

    @torch.library.register_fake(f"{lib}::iou_guided_nms")
    def _iou_guided_nms_fake(boxes, scores, ious, idxs, iou_threshold, guide):
        _check_nms_args(boxes, scores, ious, idxs)
        num_kept = torch.library.get_ctx().new_dynamic_size()
        return boxes.new_empty((num_kept,), dtype=torch.int64), scores.new_empty((num_kept,))

    @torch.library.register_fake(f"{lib}::iou_guided_nms_padded")
    def _iou_guided_nms_padded_fake(boxes, scores, ious, idxs, iou_threshold, guide):
        _check_nms_args(boxes, scores, ious, idxs)
        n = boxes.size(0)
        return boxes.new_empty((n,), dtype=torch.int64), scores.new_empty((n,)), boxes.new_empty((), dtype=torch.int64)

    @torch.library.register_fake(f"{lib}::multilevel_prroi_pool")
    def _multilevel_prroi_pool_fake(inputs, boxes, boxes_per_image, spatial_scales, canonical_box_size,
                                    canonical_level, pooled_height, pooled_width, aligned):
        torch._check(len(inputs) >= 1 and all(t.dim() == 4 for t in inputs),
                     lambda: "multilevel_prroi_pool: inputs must be a list of Tensor[N, C, H, W]")
        torch._check(boxes.dim() == 2 and boxes.size(1) == 4,
                     lambda: "multilevel_prroi_pool: boxes must be Tensor[K, 4]")
        return boxes.new_empty((boxes.size(0), inputs[0].size(1), pooled_height, pooled_width))

    @torch.library.register_fake(f"{lib}::_multilevel_prroi_pool_backward")
    def _multilevel_prroi_pool_backward_fake(grad, inputs, boxes, *args):
        return [t.new_empty(t.shape) for t in inputs], boxes.new_empty(boxes.shape)

    def _multilevel_setup_context(ctx, inputs, output):
        maps, boxes, *args = inputs
        ctx.save_for_backward(boxes, *maps)
        ctx.args = args

    def _multilevel_backward(ctx, grad):
        boxes, *maps = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_maps = any(need[0]) if isinstance(need[0], (list, tuple)) else bool(need[0])
        grad_maps, grad_boxes = torch.ops.d2_refine._multilevel_prroi_pool_backward(
            grad, maps, boxes, *ctx.args, need_maps, bool(need[1]))
        # the gradient of the list of maps is a list, of Nones when not needed (autograd checks the structure)
        grad_maps = list(grad_maps) if need_maps else [None] * len(maps)
        return (grad_maps, grad_boxes if need[1] else None) + (None,) * len(ctx.args)

    torch.library.register_autograd(
        f"{lib}::multilevel_prroi_pool", _multilevel_backward, setup_context=_multilevel_setup_context
    )
    torch.library.register_autograd(
        f"{lib}::_multilevel_prroi_pool_backward", _no_double_backward, setup_context=_no_double_backward_setup
    )

    def _prroi_pool_setup_context(ctx, inputs, output):
        input, rois, spatial_scale, pooled_height, pooled_width, aligned = inputs
        ctx.save_for_backward(input, rois)
        ctx.args = (spatial_scale, pooled_height, pooled_width, aligned)

    def _prroi_pool_backward(ctx, grad):
        input, rois = ctx.saved_tensors
        need_input, need_rois = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_input, grad_rois = torch.ops.d2_refine._prroi_pool_backward(
            grad, input, rois, *ctx.args, need_input, need_rois
        )
        return (grad_input if need_input else None, grad_rois if need_rois else None, None, None, None, None)

    torch.library.register_autograd(
        f"{lib}::prroi_pool", _prroi_pool_backward, setup_context=_prroi_pool_setup_context
    )

    torch.library.register_autograd(
        f"{lib}::_prroi_pool_backward", _no_double_backward, setup_context=_no_double_backward_setup
    )


if has_ops():
    _register()
