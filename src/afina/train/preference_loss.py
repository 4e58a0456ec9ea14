"""Preference losses (DPO, IPO, ORPO, SimPO, KTO), written once from the papers' formulas.

Every loss here takes sequence log-probabilities of answers (a tensor per pair or per example) and
returns one loss per pair or example; the training loop sums them and divides by the number of
pairs of the whole accumulated batch (see `accumulate_gradients`), so a pair weighs the same however
pairs fall into micro-batches. Notation, per pair (x, y_w, y_l) of a prompt, the chosen (winning)
and the rejected (losing) answer:

    log pi(y|x)      the policy's summed log-probability of the answer tokens
    log ref(y|x)     the same under the reference model (the model before preference tuning)
    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]

The reward a DPO-family model implies for an answer is beta * (log pi(y|x) - log ref(y|x)); its
difference between chosen and rejected is the reward margin reported in training and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from afina.data.format import IGNORE_INDEX
from afina.train.loss import LOSS_CHUNK_TOKENS, causal_lm_parts

LOSSES = ("dpo", "ipo", "orpo", "simpo", "kto")
REFERENCE_FREE = ("orpo", "simpo")  # these compare the policy with itself: no reference model is needed
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}


def dpo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """Direct Preference Optimization (Rafailov et al. 2023, "Your Language Model is Secretly a
    Reward Model", eq. 7):  L = -log sigmoid(beta * h),  h = chosen_logratio - rejected_logratio,
    where a log-ratio is log pi(y|x) - log ref(y|x) of summed answer log-probabilities."""
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))


def ipo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", eq. 17 with tau = beta):  L = (h - 1 / (2 * beta))^2.
    A squared loss that regresses the margin h to 1/(2 beta) instead of pushing it to infinity, so
    deterministic preferences do not drive the policy arbitrarily far from the reference."""
    return (chosen_logratio - rejected_logratio - 1.0 / (2.0 * beta)) ** 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, computed stably (Maechler 2012: expm1 near 0, log1p far from it)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, lam: float) -> torch.Tensor:
    """Odds Ratio Preference Optimization (Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model", eqs. 6-7):  L = L_SFT + lam * L_OR, with

        L_SFT = -mean log pi(y_w|x)   (the chosen answer's negative log-likelihood per token)
        odds(y|x) = P / (1 - P),  P = exp(mean log pi(y|x))   (length-normalised likelihood)
        L_OR  = -log sigmoid(log odds(y_w|x) - log odds(y_l|x)).

    Arguments are per-token mean log-probabilities (the paper's length normalisation)."""
    log_odds = (chosen_mean_logp - log1mexp(chosen_mean_logp)) - (rejected_mean_logp - log1mexp(rejected_mean_logp))
    return -chosen_mean_logp - lam * F.logsigmoid(log_odds)


def simpo_loss(
    chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """Simple Preference Optimization (Meng et al. 2024, "SimPO: Simple Preference Optimization with
    a Reference-Free Reward", eq. 6):  L = -log sigmoid(beta * (mean log pi(y_w|x) - mean log pi(y_l|x)) - gamma).
    The reward is the length-normalised log-likelihood scaled by beta; gamma is the target margin."""
    return -F.logsigmoid(beta * (chosen_mean_logp - rejected_mean_logp) - gamma)


def kto_loss(
    logratio: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", eq. 8), for unpaired answers each labelled desirable or undesirable:

        r = log pi(y|x) - log ref(y|x)
        z0 = max(0, KL estimate)  (detached: the reference point, no gradient through it)
        desirable:    L = lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable:  L = lambda_U * (1 - sigmoid(beta * (z0 - r)))

    `kl` is the estimate of KL(pi || ref): as in the paper, the mean log-ratio of mismatched
    (prompt, answer) pairs, whose answers were written for other prompts."""
    z0 = kl.detach().clamp(min=0)
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    return torch.where(desirable.bool(), desirable_loss, undesirable_loss)


@dataclass(frozen=True)
class PreferenceLoss:
    """One preference objective with its settings (from the recipe's `preference:` section)."""

    name: str
    beta: float
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def needs_reference(self) -> bool:
        return self.name not in REFERENCE_FREE

    @property
    def paired(self) -> bool:
        return self.name != "kto"

    def pair_losses(
        self,
        chosen: SequenceLogps,
        rejected: SequenceLogps,
        ref_chosen: torch.Tensor | None,
        ref_rejected: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-pair losses of a paired objective (dpo, ipo, orpo, simpo)."""
        if self.name in ("orpo", "simpo"):
            c, r = chosen.mean, rejected.mean
            return orpo_loss(c, r, self.beta) if self.name == "orpo" else simpo_loss(c, r, self.beta, self.simpo_gamma)
        assert ref_chosen is not None and ref_rejected is not None
        chosen_ratio, rejected_ratio = chosen.total - ref_chosen, rejected.total - ref_rejected
        if self.name == "dpo":
            return dpo_loss(chosen_ratio, rejected_ratio, self.beta)
        if self.name == "ipo":
            return ipo_loss(chosen_ratio, rejected_ratio, self.beta)
        raise ValueError(f"{self.name} is not a paired preference loss; paired losses: dpo, ipo, orpo, simpo")

    def example_losses(
        self, answer: SequenceLogps, ref_answer: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor
    ) -> torch.Tensor:
        """Per-example losses of KTO."""
        return kto_loss(
            answer.total - ref_answer, desirable, kl, self.beta, self.desirable_weight, self.undesirable_weight
        )


@dataclass
class SequenceLogps:
    """Per row: the summed log-probability of the labelled (answer) tokens, and how many there are."""

    total: torch.Tensor
    tokens: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.tokens.clamp(min=1)

    def split(self, n: int) -> tuple[SequenceLogps, SequenceLogps]:
        """The first n rows and the rest (chosen and rejected, batched together)."""
        return SequenceLogps(self.total[:n], self.tokens[:n]), SequenceLogps(self.total[n:], self.tokens[n:])


def _token_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def sequence_logps(
    model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> SequenceLogps:
    """Summed log-probabilities of each row's labelled tokens (with gradient when enabled).

    Only labelled positions go through the output layer, LOSS_CHUNK_TOKENS at a time and recomputed
    in the backward pass beyond that, as in `label_token_loss`: the full logits never exist at once.
    """
    decoder, head = causal_lm_parts(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t+1
    selected = targets != IGNORE_INDEX
    rows = selected.nonzero()[:, 0]
    hidden, flat_targets = hidden[:, :-1][selected], targets[selected]
    n = len(flat_targets)
    if n <= LOSS_CHUNK_TOKENS or not torch.is_grad_enabled():
        token_logp = _token_logprobs(head, hidden, flat_targets)
    else:
        from torch.utils.checkpoint import checkpoint

        token_logp = torch.cat(
            [
                checkpoint(
                    _token_logprobs,
                    head,
                    hidden[i : i + LOSS_CHUNK_TOKENS],
                    flat_targets[i : i + LOSS_CHUNK_TOKENS],
                    use_reentrant=False,
                )
                for i in range(0, n, LOSS_CHUNK_TOKENS)
            ]
        )
    total = torch.zeros(len(targets), device=token_logp.device, dtype=token_logp.dtype).index_add(0, rows, token_logp)
    return SequenceLogps(total, selected.sum(dim=1))
