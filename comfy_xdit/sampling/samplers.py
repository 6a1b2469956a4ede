"""Samplers over a denoiser, with the arithmetic of ComfyUI 0.3.75's k-diffusion samplers.

Every sampler is ``sampler(denoise, x, sigmas, after_step, noise) -> x``:

- ``denoise(x, sigma) -> denoised`` is the model's x0 prediction with guidance applied;
- ``after_step(i, x, denoised)`` runs once after outer step i, however many model calls the step
  made, with the step's first prediction (ComfyUI's callback also fires once per step);
- ``noise(sigma, sigma_next)`` is this rank's share of the extra noise (a ``NoiseSource``).

Flux is a CONST (rectified-flow) model, so the branches ComfyUI takes for it are written first:
the ancestral samplers are its ``*_RF`` variants and the SDE samplers work in a flow's half
log-SNR. For diffusion (EPS / V) models the deterministic samplers are the same code; of the
others only euler_ancestral has its diffusion branch here, the rest are refused for them. Scalars stay 0-d tensors of the sigmas' dtype and every expression keeps ComfyUI's order
of operations, so results agree with ComfyUI's to float rounding, not just approximately.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from .schedules import ModelSampling

Denoise = Callable[[Tensor, Tensor], Tensor]
AfterStep = Callable[[int, Tensor, Tensor], None]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]
Sampler = Callable[[Denoise, Tensor, Tensor, AfterStep, "NoiseSource"], Tensor]


class NoiseSource:
    """The extra noise of ancestral and SDE samplers, for one data-parallel rank.

    ComfyUI draws it for the whole batch at once, so each rank draws the whole batch too (same
    generator, same device type) and keeps its own rows; drawing only its rows would give other
    numbers. Called, it is ComfyUI's default noise sampler: a generator on the sampling device
    seeded with the job's seed and one full-shape draw per call. ``brownian`` gives the Brownian
    tree the SDE samplers use instead.
    """

    def __init__(self, seed: int, shape: tuple[int, ...], rows: slice = slice(None),
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.seed, self.shape, self.rows = seed, tuple(shape), rows
        self.device, self.dtype = torch.device(device), dtype
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        full = torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=self._generator)
        return full[self.rows]

    def brownian(self, sigma_min: Tensor, sigma_max: Tensor, on_cpu: bool) -> NoiseSampler:
        return _BrownianNoise(self, sigma_min, sigma_max, on_cpu)


def _ordered(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, int]:
    return (a, b, 1) if a < b else (b, a, -1)


class _BrownianNoise:
    """ComfyUI's BrownianTreeNoiseSampler for one seed, over the whole batch, cut to our rows."""

    def __init__(self, source: NoiseSource, sigma_min: Tensor, sigma_max: Tensor, on_cpu: bool) -> None:
        self.source, self.on_cpu = source, on_cpu
        self.t0, self.t1, self.sign = _ordered(torch.as_tensor(sigma_min), torch.as_tensor(sigma_max))
        self._tree = None

    def _build(self):
        # Built on first use, so a schedule that never asks for noise never pays for a tree of the
        # whole batch; its numbers depend only on these arguments, not on when it is built.
        import torchsde  # ComfyUI depends on it; only the SDE samplers need it here

        device = torch.device("cpu") if self.on_cpu else self.source.device
        w0 = torch.zeros(self.source.shape, dtype=self.source.dtype, device=device)
        t0, t1 = self.t0.detach().to(device), self.t1.detach().to(device)
        return torchsde.BrownianTree(t0, w0, t1, entropy=self.source.seed)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        if self._tree is None:
            self._tree = self._build()
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = _ordered(t0, t1)
        device, dtype = lo.device, lo.dtype
        if self.on_cpu:
            lo, hi = lo.detach().cpu().float(), hi.detach().cpu().float()
        w = self._tree(lo, hi)[self.source.rows].to(device=device, dtype=dtype) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


# --- shared pieces ------------------------------------------------------------------------------


def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    return (x - denoised) / sigma


def _ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """k-diffusion's split of a step into a deterministic part (down) and fresh noise (up)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _rf_ancestral_step(sigma, sigma_next, eta: float = 1.0):
    """The rectified-flow version: (sigma_down, the rescale of x after the step, noise scale)."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_next / alpha_down, renoise


def _toward(x: Tensor, denoised: Tensor, sigma, sigma_to) -> Tensor:
    """A flow's exact step from sigma to sigma_to along a straight line to the prediction."""
    ratio = sigma_to / sigma
    return ratio * x + (1 - ratio) * denoised


def _half_log_snr(sigma: Tensor) -> Tensor:
    return sigma.logit().neg()  # log((1 - sigma) / sigma) for a flow


def _sigma_of_half_log_snr(lam: Tensor) -> Tensor:
    return lam.neg().sigmoid()


def _offset_first_sigma(sigmas: Tensor, sampling: ModelSampling) -> Tensor:
    # sigma 1 has an infinite log-SNR; ComfyUI starts such schedules at the 0.01 % timestep instead.
    if len(sigmas) > 1 and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = sampling.percent_to_sigma(1e-4)
    return sigmas


def _brownian_for(noise: NoiseSource, sigmas: Tensor, on_cpu: bool) -> NoiseSampler:
    # The tree spans the schedule as given, before the first sigma is offset.
    return noise.brownian(sigmas[sigmas > 0].min(), sigmas.max(), on_cpu)


# --- first-order and Runge-Kutta samplers ----------------------------------------------------------


def euler(denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource) -> Tensor:
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        after_step(i, x, denoised)
    return x


def euler_ancestral(denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource) -> Tensor:
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_down, rescale, renoise = _rf_ancestral_step(sigma, sigma_next)
            x = rescale * _toward(x, denoised, sigma, sigma_down) + noise(sigma, sigma_next) * renoise
        after_step(i, x, denoised)
    return x


def euler_ancestral_diffusion(denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource) -> Tensor:
    """k-diffusion's ancestral Euler, the branch ComfyUI takes for EPS and V models."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next)
        if sigma_down == 0:
            x = denoised
        else:
            x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma) + noise(sigma, sigma_next) * 1.0 * sigma_up
        after_step(i, x, denoised)
    return x


def heun(denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource) -> Tensor:
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        d, dt = _to_d(x, sigma, denoised), sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigma_next, denoise(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        after_step(i, x, denoised)
    return x


def heunpp2(denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource) -> Tensor:
    """Heun with a third evaluation while two steps remain, weights from the first sigma."""
    end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        d, dt = _to_d(x, sigma, denoised), sigma_next - sigma
        if sigma_next == end:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigma_next, denoise(x_2, sigma_next))
            if sigmas[i + 2] == end:
                w2 = sigma_next / (2 * sigmas[0])
                d_prime = d * (1 - w2) + d_2 * w2
            else:
                x_3 = x_2 + d_2 * (sigmas[i + 2] - sigma_next)
                d_3 = _to_d(x_3, sigmas[i + 2], denoise(x_3, sigmas[i + 2]))
                w = 3 * sigmas[0]
                w2, w3 = sigma_next / w, sigmas[i + 2] / w
                d_prime = (1 - w2 - w3) * d + w2 * d_2 + w3 * d_3
            x = x + d_prime * dt
        after_step(i, x, denoised)
    return x


def _dpm_2_step(denoise: Denoise, x, d, sigma, sigma_to) -> Tensor:
    """DPM-Solver-2: a half step (geometric midpoint) for the slope, then the whole step with it."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    return x + _to_d(x_2, sigma_mid, denoise(x_2, sigma_mid)) * (sigma_to - sigma)


def dpm_2(denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource) -> Tensor:
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        d = _to_d(x, sigma, denoised)
        x = x + d * (sigma_next - sigma) if sigma_next == 0 else _dpm_2_step(denoise, x, d, sigma, sigma_next)
        after_step(i, x, denoised)
    return x


def dpm_2_ancestral(denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource) -> Tensor:
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, rescale, renoise = _rf_ancestral_step(sigma, sigma_next)
        d = _to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            x = rescale * _dpm_2_step(denoise, x, d, sigma, sigma_down) + noise(sigma, sigma_next) * renoise
        after_step(i, x, denoised)
    return x


# --- multistep samplers ------------------------------------------------------------------------------


def _lms_coefficient(order: int, t, i: int, j: int) -> float:
    """Integral over [t_i, t_i+1] of the Lagrange basis polynomial of point i - j."""
    from scipy import integrate

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def lms(
    denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource, order: int = 4
) -> Tensor:
    t = sigmas.detach().cpu().numpy()  # ComfyUI integrates over the float32 sigmas
    slopes: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        slopes = (slopes + [_to_d(x, sigmas[i], denoised)])[-order:]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            n = min(i + 1, order)
            coefficients = [_lms_coefficient(n, t, i, j) for j in range(n)]
            x = x + sum(c * d for c, d in zip(coefficients, reversed(slopes)))
        after_step(i, x, denoised)
    return x


def _t(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


def _sigma_of_t(t: Tensor) -> Tensor:
    return t.neg().exp()


def dpmpp_2m(denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource) -> Tensor:
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is not None and sigmas[i + 1] != 0:
            r = (t - _t(sigmas[i - 1])) / h
            target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        else:
            target = denoised
        x = (_sigma_of_t(t_next) / _sigma_of_t(t)) * x - (-h).expm1() * target
        old_denoised = denoised
        after_step(i, x, denoised)
    return x


def ipndm(
    denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource, max_order: int = 4
) -> Tensor:
    """Adams-Bashforth on the slopes with fixed (uniform-step) weights, order growing to 4."""
    history: list[Tensor] = []  # older slopes, newest last
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma
        order, dt = min(max_order, i + 1), sigma_next - sigma
        if sigma_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + dt * d
        elif order == 2:
            x_next = x + dt * (3 * d - history[-1]) / 2
        elif order == 3:
            x_next = x + dt * (23 * d - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            x_next = x + dt * (55 * d - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [d])[-(max_order - 1):]
        x = x_next
        after_step(i, x, denoised)
    return x


def _res_multistep(
    denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource, eta: float
) -> Tensor:
    """RES second-order multistep (arXiv 2308.02157); ComfyUI uses its non-RF ancestral split here."""
    old_denoised = old_sigma_down = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0 or old_denoised is None:
            x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            c2 = (_t(sigmas[i - 1]) - _t(old_sigma_down)) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            x = _sigma_of_t(h) * x + h * (b1 * denoised + b2 * old_denoised)
        # With eta 0 the noise is scaled by zero; ComfyUI draws it anyway, which changes nothing.
        if sigma_next > 0 and eta:
            x = x + noise(sigma, sigma_next) * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
        after_step(i, x, denoised)
    return x


# --- DPM-Solver++ with noise -------------------------------------------------------------------------


def dpmpp_2s_ancestral(denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource) -> Tensor:
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, rescale, renoise = _rf_ancestral_step(sigma, sigma_next)
        if sigma_next == 0:
            x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            if sigma == 1.0:
                sigma_s = sigma.new_tensor(0.9999)  # the midpoint formula is undefined at sigma 1
            else:
                lam, lam_down = ((1 - sigma) / sigma).log(), ((1 - sigma_down) / sigma_down).log()
                sigma_s = ((lam + 0.5 * (lam_down - lam)).exp() + 1) ** -1
            x = _toward(x, denoise(_toward(x, denoised, sigma, sigma_s), sigma_s), sigma, sigma_down)
            x = rescale * x + noise(sigma, sigma_next) * renoise
        after_step(i, x, denoised)
    return x


def dpmpp_sde(
    denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource, *,
    sampling: ModelSampling, tree_on_cpu: bool = True, r: float = 0.5,
) -> Tensor:
    if len(sigmas) <= 1:
        return x
    brownian = _brownian_for(noise, sigmas, tree_on_cpu)
    sigmas = _offset_first_sigma(sigmas, sampling)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            lam_s, lam_t = _half_log_snr(sigma), _half_log_snr(sigma_next)
            lam_mid = lam_s + r * (lam_t - lam_s)
            sigma_mid = _sigma_of_half_log_snr(lam_mid)
            alpha_s = sigma * lam_s.exp()
            alpha_mid = sigma_mid * lam_mid.exp()
            alpha_t = sigma_next * lam_t.exp()

            # Stage 1: ancestral step to the midpoint.
            down, up = _ancestral_step(lam_s.neg().exp(), lam_mid.neg().exp())
            h = down.log().neg() - lam_s
            x_2 = (alpha_mid / alpha_s) * (-h).exp() * x - alpha_mid * (-h).expm1() * denoised
            x_2 = x_2 + alpha_mid * brownian(sigma, sigma_mid) * up
            denoised_2 = denoise(x_2, sigma_mid)

            # Stage 2: the whole step with the blended prediction.
            down, up = _ancestral_step(lam_s.neg().exp(), lam_t.neg().exp())
            h = down.log().neg() - lam_s
            fac = 1 / (2 * r)
            blended = (1 - fac) * denoised + fac * denoised_2
            x = (alpha_t / alpha_s) * (-h).exp() * x - alpha_t * (-h).expm1() * blended
            x = x + alpha_t * brownian(sigma, sigma_next) * up
        after_step(i, x, denoised)
    return x


def dpmpp_2m_sde(
    denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource, *,
    sampling: ModelSampling, tree_on_cpu: bool = True, solver: str = "midpoint",
) -> Tensor:
    if len(sigmas) <= 1:
        return x
    brownian = _brownian_for(noise, sigmas, tree_on_cpu)
    sigmas = _offset_first_sigma(sigmas, sampling)
    old_denoised = h = h_last = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            lam_s, lam_t = _half_log_snr(sigma), _half_log_snr(sigma_next)
            h = lam_t - lam_s
            h_eta = h * 2.0  # (eta + 1) with KSampler's eta of 1
            alpha_t = sigma_next * lam_t.exp()
            x = sigma_next / sigma * (-h).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            x = x + brownian(sigma, sigma_next) * sigma_next * (-2 * h).expm1().neg().sqrt()
        old_denoised, h_last = denoised, h
        after_step(i, x, denoised)
    return x


def dpmpp_3m_sde(
    denoise: Denoise, x: Tensor, sigmas: Tensor, after_step: AfterStep, noise: NoiseSource, *,
    sampling: ModelSampling, tree_on_cpu: bool = True,
) -> Tensor:
    if len(sigmas) <= 1:
        return x
    brownian = _brownian_for(noise, sigmas, tree_on_cpu)
    sigmas = _offset_first_sigma(sigmas, sampling)
    denoised_1 = denoised_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            lam_s, lam_t = _half_log_snr(sigma), _half_log_snr(sigma_next)
            h = lam_t - lam_s
            h_eta = h * 2.0  # (eta + 1) with KSampler's eta of 1
            alpha_t = sigma_next * lam_t.exp()
            x = sigma_next / sigma * (-h).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * ((denoised - denoised_1) / (h_1 / h))
            x = x + brownian(sigma, sigma_next) * sigma_next * (-2 * h).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        after_step(i, x, denoised)
    return x


SAMPLERS: dict[str, Sampler] = {
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "heunpp2": heunpp2,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "lms": lms,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_sde_gpu": partial(dpmpp_sde, tree_on_cpu=False),
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": partial(dpmpp_2m_sde, tree_on_cpu=False),
    "dpmpp_2m_sde_heun": partial(dpmpp_2m_sde, solver="heun"),
    "dpmpp_2m_sde_heun_gpu": partial(dpmpp_2m_sde, solver="heun", tree_on_cpu=False),
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": partial(dpmpp_3m_sde, tree_on_cpu=False),
    "ipndm": ipndm,
    "res_multistep": partial(_res_multistep, eta=0.0),
    "res_multistep_ancestral": partial(_res_multistep, eta=1.0),
}

# These work in log-SNR, which needs the model's time shift to move a first sigma of 1.
_NEEDS_SAMPLING = {name for name in SAMPLERS if "sde" in name}


# Samplers whose ComfyUI code branches on the model type, with the diffusion (EPS / V) branch
# written here; None: only the flow branch is, so they are refused for diffusion models.
_DIFFUSION_BRANCHES = {"euler_ancestral": euler_ancestral_diffusion, "dpm_2_ancestral": None, "dpmpp_2s_ancestral": None,
                       **{name: None for name in _NEEDS_SAMPLING}}


def is_flow(sampling: ModelSampling) -> bool:
    from .schedules import ConstPrediction

    return isinstance(sampling, ConstPrediction)


def samplers_for(sampling: ModelSampling) -> list[str]:
    """The sampler names this model sampling supports."""
    return [name for name in SAMPLERS if is_flow(sampling) or _DIFFUSION_BRANCHES.get(name, SAMPLERS[name]) is not None]


def get_sampler(name: str, sampling: ModelSampling) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"sampler_name {name!r} is not supported; choose one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name]
    if not is_flow(sampling) and name in _DIFFUSION_BRANCHES:
        sampler = _DIFFUSION_BRANCHES[name]
        if sampler is None:
            raise ValueError(f"sampler_name {name!r} is not supported for this (non-flow) model yet; "
                             f"choose one of {', '.join(samplers_for(sampling))}")
        return sampler
    return partial(sampler, sampling=sampling) if name in _NEEDS_SAMPLING else sampler
