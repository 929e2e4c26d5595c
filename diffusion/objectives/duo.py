"""DUO: uniform-state diffusion, its Gaussian-relaxation curriculum and discrete consistency
distillation (Sahoo et al., ICML 2025, "The Diffusion Duality").

Forward process: every token independently keeps its value with probability alpha_t and is
otherwise redrawn uniformly from the K = V - 1 real tokens (the mask id is never used):

    q_t(x_t | x) = alpha_t [x_t = x] + (1 - alpha_t) / K      ("xbar" = K q_t = K alpha_t x + 1 - alpha_t)

The model predicts x_theta (a distribution over the K tokens, DUO's "mean" parameterization);
its reverse rates are those of q with x replaced by x_theta. The continuous-time NELBO
(USDM / UDLM, Schiff et al. 2024) per token, at z = x_t and beta = -alpha'/alpha:

    (beta / K) sum_{z' != z} [ xbar_theta(z') / xbar_theta(z) - xbar(z') / xbar(z)
                               + xbar(z') / xbar(z) log(xbar(z') xbar_theta(z) / (xbar(z) xbar_theta(z'))) ]

which is >= 0 and zero iff the rates agree; `usdm_nelbo` evaluates it in O(K) by using that
xbar takes two values, plus the prior term KL(q_1(. | x) || uniform).

Curriculum (`curriculum=true`): during the first `curriculum_end` steps x_t is the argmax of a
Gaussian latent w = a_g x + s_g eps (gamma linear in t, a_g^2 = sigmoid(-gamma)), which is
exactly the uniform process at alpha_t = T(gamma) (the diffusion transformation operator:
T(gamma) = (K P(argmax w = x) - 1) / (K - 1), a 1-D integral computed by quadrature), and the
network sees the tempered softmax of w (soft tokens) instead of the one-hot of x_t: a
lower-variance path early in training. Afterwards (and in evaluation) it is the discrete NELBO.

Distillation (`DUODistill`, parameterization=duo_distill): discrete consistency distillation.
A teacher (the model being distilled, frozen, refreshed from the student every
`update_teacher_every` steps) sees x_s and the student x_t, s = t - dt, both argmaxes of the
same Gaussian noise (DUO's deterministic coupling); the loss is KL(student || teacher) and dt
doubles every round, so the student learns to jump further in one step.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.noise import NoiseSchedule
from diffusion.objectives.base import AbsorbingDiffusion, LossOutput, Objective, Rows

NEG_INF = -1e6
QUAD_POINTS = 2001  # trapezoid nodes on [-QUAD_RANGE, QUAD_RANGE] for the argmax integral
QUAD_RANGE = 10.0


# ---- the uniform-state NELBO ---------------------------------------------------------------
def usdm_nelbo(log_x_theta: Tensor, x0: Tensor, x_t: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """(B, L) continuous-time NELBO integrand of the uniform process, in compact token space.

    log_x_theta (B, L, K) log of the predicted clean distribution; x0, x_t (B, L) in [0, K);
    alpha, beta (B, L) or broadcastable: alpha_t and the rate -alpha'_t / alpha_t.
    At alpha = 1 (t = 0) the true rates' 0 log 0 terms are taken at their limit 0, so a token
    with x_t = x0 scores (beta / K) (1 / x_theta(x_t) - 1), finite, as are its gradients.
    """
    K = log_x_theta.shape[-1]
    a = alpha.to(torch.float64)
    x_theta = log_x_theta.to(torch.float64).exp()
    xbar_theta = K * a[..., None] * x_theta + (1 - a[..., None])  # (B, L, K)
    log_xbar_theta = xbar_theta.log()
    z = x_t[..., None]
    xbar_theta_z = xbar_theta.gather(-1, z).squeeze(-1)  # (B, L)
    log_xbar_theta_z = log_xbar_theta.gather(-1, z).squeeze(-1)
    log_xbar_theta_x = log_xbar_theta.gather(-1, x0[..., None]).squeeze(-1)
    is_same = x0 == x_t
    same = is_same.to(torch.float64)
    hi, lo = K * a + 1 - a, 1 - a  # the two values of xbar: at x, elsewhere
    xbar_z = same * hi + (1 - same) * lo  # (B, L)
    log_hi, log_lo = torch.log(hi), torch.log(lo)  # log_lo = -inf at alpha = 1
    log_xbar_z = torch.where(is_same, log_hi, log_lo)  # no 0 * -inf
    # sum over every z' of xbar(z') log xbar(z') and of xbar(z') log xbar_theta(z'), minus z
    all_true = torch.xlogy((K - 1) * lo, lo) + hi * log_hi  # 0 log 0 = 0 at alpha = 1
    all_theta = lo * log_xbar_theta.sum(-1) + K * a * log_xbar_theta_x
    rest_true = all_true - xbar_z * log_xbar_z
    rest_theta = all_theta - xbar_z * log_xbar_theta_z
    bracket = (
        K / xbar_theta_z
        - K / xbar_z
        + (rest_true - rest_theta) / xbar_z
        + (K - xbar_z) / xbar_z * (log_xbar_theta_z - log_xbar_z)
    )
    return (beta.to(torch.float64) / K * bracket).float()


def uniform_prior_kl(alpha_1: Tensor, K: int) -> Tensor:
    """KL(q_1(. | x) || uniform) per token: sum_j (xbar_j / K) log xbar_j at alpha_1."""
    a = alpha_1.to(torch.float64)
    hi, lo = K * a + 1 - a, 1 - a
    return ((hi * torch.log(hi) + (K - 1) * lo * torch.log(lo)) / K).float()


# ---- the diffusion transformation operator (Gaussian -> uniform state) -------------------
def gaussian_scales(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """DUO's variance-preserving Gaussian: a_g = sqrt(sigmoid(-gamma)), s_g = sqrt(sigmoid(gamma))."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def argmax_alpha(gamma: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """alpha = T(gamma) and d alpha / d gamma (float64): the uniform-state alpha_t whose x_t is
    distributed as argmax(a_g onehot(x) + s_g eps). With r = a_g / s_g = exp(-gamma / 2),
    P(argmax = x) = int phi(z) Phi(z + r)^(K - 1) dz and alpha = (K P - 1) / (K - 1)."""
    g = gamma.to(torch.float64)
    r = torch.exp(-g / 2)[..., None]  # (..., 1)
    z = torch.linspace(-QUAD_RANGE, QUAD_RANGE, QUAD_POINTS, dtype=torch.float64, device=g.device)
    log_phi = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    log_cdf = torch.special.log_ndtr(z + r)  # (..., N)
    dz = z[1] - z[0]
    p = torch.trapezoid(torch.exp(log_phi + (K - 1) * log_cdf), dx=dz, dim=-1)
    log_pdf_shift = -0.5 * (z + r) ** 2 - 0.5 * math.log(2 * math.pi)
    dp_dr = torch.trapezoid(
        (K - 1) * torch.exp(log_phi + (K - 2) * log_cdf + log_pdf_shift), dx=dz, dim=-1
    )
    alpha = (K * p - 1) / (K - 1)
    dalpha_dgamma = K / (K - 1) * dp_dr * (-r[..., 0] / 2)
    return alpha.clamp(1e-12, 1.0), dalpha_dgamma


def per_row_normal(shape: tuple[int, ...], generator, device, rows: Rows, batch: int) -> Tensor:
    """(B, ...) standard normals, one seeded stream per global row: the same row draws the same
    noise however the global batch is split (a (global B, L, K) draw would not fit)."""
    if generator is None:
        return torch.randn((batch, *shape), device=device, dtype=torch.float32)
    base = int(generator.initial_seed())
    index = rows[0].tolist() if rows is not None else list(range(batch))
    out = []
    for i in index:
        seed = int(np.random.SeedSequence([base, int(i)]).generate_state(1)[0])
        g = torch.Generator(device=generator.device).manual_seed(seed)
        out.append(torch.randn(shape, generator=g, device=generator.device, dtype=torch.float32))
    return torch.stack(out).to(device)


# ---- the objective ---------------------------------------------------------------------------
class DUO(Objective):
    """Uniform-state diffusion with the USDM NELBO; optional Gaussian-relaxation curriculum."""

    provides: ClassVar[frozenset[str]] = frozenset({"uniform"})
    exact_likelihood: ClassVar[bool] = False

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_id: int,
        vocab_size: int,
        time_conditioning: bool = True,
        mask_conditioning: bool = False,
        T: int = 0,
        sampling_eps: float = 1e-3,
        antithetic: bool = True,
        prior_loss: bool = True,
        curriculum: bool = False,
        curriculum_start: int = 0,
        curriculum_end: int = 500_000,
        gumbel_tau_log10_start: float = -3.0,
        gumbel_tau_log10_end: float = -3.0,
        gamma_min: float = -3.5,
        gamma_max: float = -1.75,
        states: str = "real",
    ) -> None:
        """`states`: what the uniform noise ranges over: "real", the K = V - 1 ids other than
        the mask id (ours), or "vocab", all K = V ids, the mask id one more state, as DUO's own
        code draws over every id of its tokenizer (its GPT-2 vocabulary of 50 258 counts an
        added [PAD] where ours holds [MASK]; its BERT one counts [MASK]): its checkpoints."""
        super().__init__()
        if states not in ("real", "vocab"):
            raise ValueError(f"parameterization.states={states!r}: expected real or vocab")
        if not time_conditioning:
            raise ValueError(
                "parameterization=duo needs time_conditioning=true: with uniform noise x_t does "
                "not reveal its noise level, so the model must be told sigma = -log alpha_t"
            )
        if mask_conditioning:
            raise ValueError("parameterization=duo has no mask token: set mask_conditioning=false")
        if T != 0:
            raise ValueError(f"parameterization=duo is continuous-time: set T=0 (got T={T})")
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} is outside the vocabulary of size {vocab_size}")
        if curriculum and not gamma_min < gamma_max:
            raise ValueError(
                f"parameterization.gamma_min={gamma_min} must be < gamma_max={gamma_max}"
            )
        self.noise = noise
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.states = states
        self.K = vocab_size - (states == "real")  # the states the uniform noise draws
        self.time_conditioned = True
        self.mask_conditioning = False
        self.T = 0
        self.sampling_eps = sampling_eps
        self.antithetic = antithetic
        self.prior_loss = prior_loss
        self.curriculum = curriculum
        self.curriculum_start = curriculum_start
        self.curriculum_end = curriculum_end
        self.tau_log10 = (gumbel_tau_log10_start, gumbel_tau_log10_end)
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        self.step = 0

    def set_training_step(self, step: int) -> None:
        """The optimizer step (DiffusionModule calls this before each training loss)."""
        self.step = int(step)

    def denoiser(self, backbone: nn.Module):
        """x_theta and the schedule for the uniform-state samplers (samplers/uniform.py)."""
        return UniformDenoiser(backbone, self)

    # ---- token spaces: full vocabulary (with the mask id) <-> the K real tokens ----------------
    def compact(self, x: Tensor) -> Tensor:
        return x if self.states == "vocab" else x - (x > self.mask_id).long()

    def expand(self, c: Tensor) -> Tensor:
        return c if self.states == "vocab" else c + (c >= self.mask_id).long()

    def real_tokens(self, x0: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(x0 with every mask-id token replaced by a real one, the (B, L) scored positions).

        The uniform process has no state for the mask id: a data token equal to it (a literal
        "[MASK]" in BERT-tokenised text) was compacted onto its neighbour's index and scored as
        that token (or, as the last id, indexed past K). It is not scored, with the warning
        the absorbing objectives give (`scored_positions`), and noised as a real token. With
        states=vocab the mask id is a state like any other: kept and scored."""
        if self.states == "vocab":
            return x0, attention_mask
        scored = self.scored_positions(x0, attention_mask, None)
        stand_in = 1 if self.mask_id == 0 else 0
        return x0.masked_fill(x0 == self.mask_id, stand_in), scored

    def log_x_theta(self, logits: Tensor) -> Tensor:
        """(B, L, V) logits -> (B, L, K) float32 log x_theta over the K states."""
        if self.states == "vocab":
            return logits.float().log_softmax(-1)
        keep = torch.cat([logits[..., : self.mask_id], logits[..., self.mask_id + 1 :]], -1)
        return keep.float().log_softmax(-1)

    # ---- time and forward process -----------------------------------------------------------
    def sample_t(self, n: int, device, generator=None, rows: Rows = None) -> Tensor:
        """Stratified t in [eps, 1] over the global batch (as the absorbing objectives)."""
        return AbsorbingDiffusion.sample_t(self, n, device, generator, rows)

    def q_xt(self, x0: Tensor, alpha: Tensor, generator=None, rows: Rows = None) -> Tensor:
        """Keep each token with probability alpha (B, 1), else a uniform real token."""
        total = x0.shape[0] if rows is None else rows[1]
        u = torch.rand(
            (total, x0.shape[1]), device=x0.device, generator=generator, dtype=torch.float32
        )
        new = torch.randint(0, self.K, (total, x0.shape[1]), device=x0.device, generator=generator)
        if rows is not None:
            index = rows[0].to(u.device)
            u, new = u[index], new[index]
        return torch.where(u < 1 - alpha, self.expand(new), x0)

    def alpha_beta(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t and beta_t = -alpha'_t / alpha_t = dsigma(t) of the discrete schedule, in
        float64: the NELBO needs 1 - alpha_t, which a float32 alpha_t rounds near t = 0 (cosine
        at t = 1e-3: 1 - alpha = 1.2e-6, 2% off, and so the terms of every changed token)."""
        t64 = t.to(torch.float64)
        return self.noise.alpha(t64), self.noise.dsigma(t64)

    def curriculum_active(self) -> bool:
        return self.curriculum and self.training and self.step < self.curriculum_end

    def inverse_tau(self) -> float:
        """1 / tau of the tempered softmax, log10(tau) linear from start to end of the curriculum."""
        start, end = self.tau_log10
        span = max(self.curriculum_end - self.curriculum_start, 1)
        frac = min(max((self.step - self.curriculum_start) / span, 0.0), 1.0)
        return 10.0 ** (-(start + frac * (end - start)))

    def gamma(self, t: Tensor) -> Tensor:
        return self.gamma_min + t.to(torch.float64) * (self.gamma_max - self.gamma_min)

    def gaussian_alpha_beta(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t = T(gamma(t)) and beta_t = -alpha'_t / alpha_t under the Gaussian schedule."""
        alpha, dalpha_dgamma = argmax_alpha(self.gamma(t), self.K)
        dalpha_dt = dalpha_dgamma * (self.gamma_max - self.gamma_min)
        return alpha.float(), (-dalpha_dt / alpha).float()

    def gaussian_latent(self, x0: Tensor, gamma: Tensor, eps: Tensor) -> Tensor:
        """(B, L, K) w = a_g onehot(x0) + s_g eps in compact token space."""
        a_g, s_g = gaussian_scales(gamma.float())
        onehot = F.one_hot(self.compact(x0), self.K).float()
        return a_g[:, None, None] * onehot + s_g[:, None, None] * eps

    def soft_tokens(self, w: Tensor, inv_tau: float) -> Tensor:
        """(B, L, K) latent -> (B, L, V) tempered softmax weights (zero on the mask id)."""
        p = (w * inv_tau).softmax(-1)
        if self.states == "vocab":
            return p
        zero = torch.zeros_like(p[..., :1])
        return torch.cat([p[..., : self.mask_id], zero, p[..., self.mask_id :]], -1)

    # ---- the loss -----------------------------------------------------------------------------
    def loss(
        self,
        backbone: nn.Module,
        x0: Tensor,
        attention_mask: Tensor,
        generator=None,
        loss_mask: Tensor | None = None,
        rows: Rows = None,
    ) -> LossOutput:
        """One-sample NELBO per token; the curriculum's relaxed pass while it is active."""
        if loss_mask is not None:
            raise ValueError("parameterization=duo has no loss_mask support (SFT): use subs")
        B, L = x0.shape
        targets, (x0, scored) = x0, self.real_tokens(x0, attention_mask)
        t = self.sample_t(B, x0.device, generator, rows)  # (B,)
        if self.curriculum_active():
            alpha, beta = self.gaussian_alpha_beta(t)
            alpha_1 = argmax_alpha(self.gamma(t.new_ones(1)), self.K)[0]  # this process's q_1
            eps = per_row_normal((L, self.K), generator, x0.device, rows, B)
            w = self.gaussian_latent(x0, self.gamma(t), eps)  # (B, L, K)
            x_t = self.expand(w.argmax(-1))
            net_in = self.soft_tokens(w, self.inverse_tau())
        else:
            alpha, beta = self.alpha_beta(t)
            alpha_1 = self.noise.alpha(t.new_ones(1, dtype=torch.float64))
            x_t = self.q_xt(x0, alpha[:, None], generator, rows)
            net_in = x_t
        sigma = -torch.log(alpha).float()  # as UniformDenoiser conditions the backbone
        logits = backbone(net_in, sigma, attention_mask)
        nll = usdm_nelbo(
            self.log_x_theta(logits),
            self.compact(x0),
            self.compact(x_t),
            alpha[:, None],
            beta[:, None],
        )
        if self.prior_loss:  # KL(q_1 || uniform) of the process x_t came from
            nll = nll + uniform_prior_kl(alpha_1, self.K)[:, None]
        return LossOutput(nll=nll, mask=scored.to(nll.dtype), targets=targets)


CURRICULUM_KEYS = ("curriculum", "gumbel_tau_log10")  # DUO's curriculum settings


class DUODistill(DUO):
    """DUO's discrete consistency distillation of a trained DUO model into a few-step sampler.

    Start it from the trained model (`training.init_from_ckpt=...`): the teacher is a frozen
    copy of the student, refreshed every `update_teacher_every` steps, and dt = 2^round / T_distill
    grows as the rounds go by. Evaluation reports the DUO NELBO of the student.
    """

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_id: int,
        vocab_size: int,
        gamma_min: float = -4.0,
        gamma_max: float = -1.0,
        distill_T: int = 512,
        update_teacher_every: int = 10_000,
        loss_type: str = "kl-bwd",
        **duo: Any,
    ) -> None:
        """`duo`: DUO's own settings (time_conditioning, T, sampling_eps, antithetic,
        prior_loss, ...); the curriculum is DUO's training, not distillation's, so it is off.
        gamma_min / gamma_max: DUO's distillation range (GPT-2 vocabulary)."""
        curriculum = sorted(k for k in duo if k.startswith(CURRICULUM_KEYS))
        if curriculum:
            raise ValueError(
                f"parameterization=duo_distill takes no curriculum settings ({curriculum}): "
                "the curriculum belongs to DUO's training (parameterization=duo)"
            )
        super().__init__(
            noise, mask_id, vocab_size, gamma_min=gamma_min, gamma_max=gamma_max, **duo
        )
        if loss_type not in ("kl-bwd", "kl-fwd"):
            raise ValueError(f"parameterization.loss_type={loss_type!r}: expected kl-bwd or kl-fwd")
        if distill_T < 1 or update_teacher_every < 1:
            raise ValueError(
                "parameterization.distill_T and parameterization.update_teacher_every must be >= 1"
            )
        self.distill_T = distill_T
        self.update_teacher_every = update_teacher_every
        self.loss_type = loss_type
        self._teacher: list[nn.Module] = []  # hidden from the state dict (rebuilt from the student)
        self._teacher_round = -1

    def dt(self) -> float:
        """The teacher's step: 2^round / distill_T (round = step // update_teacher_every)."""
        return min(2 ** (self.step // self.update_teacher_every) / self.distill_T, 1.0)

    def teacher(self, backbone: nn.Module) -> nn.Module:
        """The frozen teacher: a copy of the student, refreshed at the start of every round."""
        round_ = self.step // self.update_teacher_every
        if not self._teacher:
            self._teacher.append(copy.deepcopy(backbone).eval().requires_grad_(False))
        elif round_ != self._teacher_round:
            self._teacher[0].load_state_dict(backbone.state_dict())
        self._teacher_round = round_
        return self._teacher[0]

    def loss(
        self,
        backbone: nn.Module,
        x0: Tensor,
        attention_mask: Tensor,
        generator=None,
        loss_mask: Tensor | None = None,
        rows: Rows = None,
    ) -> LossOutput:
        """Training: per-token KL between the student at x_t and the teacher at x_s on one
        Gaussian trajectory; evaluation: the DUO NELBO."""
        if not self.training:
            return super().loss(backbone, x0, attention_mask, generator, loss_mask, rows)
        B, L = x0.shape
        targets, (x0, scored) = x0, self.real_tokens(x0, attention_mask)
        dt = self.dt()
        t = (self.sample_t(B, x0.device, generator, rows) + dt).clamp(max=1.0)  # (B,)
        s = t - dt
        gamma_t, gamma_s = self.gamma(t), self.gamma(s)
        alpha_t = argmax_alpha(gamma_t, self.K)[0].float()
        alpha_s = argmax_alpha(gamma_s, self.K)[0].float()
        eps = per_row_normal((L, self.K), generator, x0.device, rows, B)  # shared by t and s
        x_t = self.expand(self.gaussian_latent(x0, gamma_t, eps).argmax(-1))
        x_s = self.expand(self.gaussian_latent(x0, gamma_s, eps).argmax(-1))
        student = self.log_x_theta(backbone(x_t, -torch.log(alpha_t), attention_mask))
        teacher_net = self.teacher(backbone)
        with torch.no_grad():
            teacher = self.log_x_theta(teacher_net(x_s, -torch.log(alpha_s), attention_mask))
        if self.loss_type == "kl-bwd":
            kl = (student.exp() * (student - teacher)).sum(-1)
        else:
            kl = (teacher.exp() * (teacher - student)).sum(-1)
        return LossOutput(nll=kl, mask=scored.to(kl.dtype), targets=targets)


class UniformDenoiser:
    """What the uniform-state samplers call: log x_theta over the vocabulary (the mask column
    -inf unless it is a state) and the discrete schedule; `mask_is_state`: the noise draws the
    mask id too (states=vocab; samplers.uniform.states builds the set of ids from it)."""

    def __init__(self, backbone: nn.Module, objective: DUO) -> None:
        self.backbone = backbone
        self.objective = objective
        self.mask_id = objective.mask_id
        self.vocab_size = objective.vocab_size
        self.time_conditioned = True
        self.capabilities = objective.capabilities
        self.mask_is_state = objective.states == "vocab"

    def alpha(self, t: Tensor) -> Tensor:
        return self.objective.noise.alpha(t)

    @torch.no_grad()
    def log_p_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        """(B, L), (B,) -> (B, L, V) log x_theta (the mean parameterization's clean
        distribution; -inf-like on the mask id, which uniform noise never produces, unless
        the mask id is a state)."""
        alpha = self.objective.noise.alpha(t.to(torch.float64))  # as the loss: float64 alpha_t
        logits = self.backbone(x_t, -torch.log(alpha).float(), None)
        log_x = self.objective.log_x_theta(logits)  # (B, L, K)
        if self.mask_is_state:
            return log_x
        col = torch.full_like(log_x[..., :1], NEG_INF)
        m = self.mask_id
        return torch.cat([log_x[..., :m], col, log_x[..., m:]], -1)
