"""Shared by the families' tests: per-step backward versus the authors' one backward of the sum."""
import torch

from lowvram_dopsd.losses import dopsd_loss
from lowvram_dopsd.train import rollout_and_learn


def assert_per_step_backward_equals_summed(family, model, lora, c_s, c_t, noise, sigmas, loss_kind):
    """Our per-step backward (states detached, each step's loss back-propagated at once) must give
    the gradients of the authors' way: all K graphs alive, one backward of the mean loss."""
    with torch.no_grad():  # non-zero, different student and teacher sets: every gradient term is live
        for layer in lora.layers.values():
            layer.student_B.normal_(std=0.05)
            layer.teacher_B.normal_(std=0.05)
    params = lora.student_parameters()
    K = len(sigmas) - 1
    losses, _ = rollout_and_learn(family, model, lora, noise.clone(), sigmas, [c_s], [c_t], set(range(K)),
                                  loss_kind, loss_scale=1 / K)
    per_step = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    x, total = noise.clone(), 0.0
    with lora.use("student"):  # inside: gradient checkpointing re-runs the student forward in backward
        for k in range(K):
            with torch.no_grad(), lora.use("teacher"):
                v_t = family.velocity(model, x, sigmas[k], [c_t])
            v_s = family.velocity(model, x, sigmas[k], [c_s])
            total = total + dopsd_loss(loss_kind, v_s, v_t, sigmas[k])
            x = x + (sigmas[k + 1] - sigmas[k]) * v_s.detach()
        (total / K).backward()
    assert abs(sum(losses) / K - total.item() / K) < 1e-6 * max(1.0, abs(total.item()))
    assert sum(p.grad.abs().sum() for p in params) > 0
    for a, p in zip(per_step, params):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7)
