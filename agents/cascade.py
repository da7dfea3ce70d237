"""Confidence cascades: a small static network answers the images it is sure of, a larger one the rest.

The plainest input-adaptive network (the early-exit idea of BranchyNet, with separately trained
networks): every image runs the small network; an image whose top softmax probability is under a
threshold runs the next network from the start (nothing reused) and takes its answer, and so on
to the last. Its FLOPs per image are the sum of the networks it ran.

It is the control that tells whether per-image compute pays on a backbone at all: its parts are
the static networks of the comparison themselves (fine-tuned fixed subsets, and the full
backbone, which every method's budget already includes), so it costs the fine-tuning of the
subsets it chains, and its thresholds for a FLOPs budget are chosen on held-out images and then
scored on the test split, like any policy. Its last network may also be trained for the images it
will get (:func:`focused_loss`): the full backbone fine-tuned with the same budget, each image
weighted by how unsure the first network is of it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agents.adaptivity import adaptivity
from backbone.models.masked import FixedSubset


@dataclass
class ScoredNetwork:
    """One network's logits (float32, CPU) on the held-out and test images, its FLOPs ratio
    (per image, to the full backbone's) and its keep mask (which blocks it runs)."""

    name: str
    flops_ratio: float
    mask: torch.Tensor
    held_out_logits: torch.Tensor
    test_logits: torch.Tensor

    # A cascade search tries thousands of thresholds on the same logits: each network's
    # confidences and predictions once.
    @functools.cached_property
    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence, prediction) per held-out image."""
        return confidence(self.held_out_logits), self.held_out_logits.argmax(1)

    @functools.cached_property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence, prediction) per test image."""
        return confidence(self.test_logits), self.test_logits.argmax(1)


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Per image: the top softmax probability (the cascade's exit signal)."""
    return logits.float().softmax(1).max(1).values


#: The focus of :func:`focused_loss`: weights (1 − top probability) ** FOCUS_POWER. On akamaster's
#: ResNet-32 powers 1 and 2 gave cascades equal within 0.1 point over two seeds, and 4 (too few
#: images left to learn from) lost 0.3-0.4 (docs/results.md): the plainest one.
FOCUS_POWER = 1.0


def focused_loss(model: torch.nn.Module, first_stage: torch.nn.Module, first_mask: torch.Tensor,
                 label_smoothing: float = 0.0, power: float = FOCUS_POWER):
    """The training loss of a cascade's last stage (``model``; a ``loss_fn`` of
    ``backbone.training.loop.train``): each image's cross-entropy weighted by how unsure the first
    stage (``first_stage`` run with ``first_mask``, frozen, in eval mode) is of it, ``(1 − its top
    probability) ** power``, normalised to a mean weight of 1 in every batch.

    Why: a cascade's last stage answers only the images the first one is unsure of, so its
    accuracy elsewhere is never used; a plainly fine-tuned full backbone is right on only ~half of
    the images a small subset gets wrong (docs/results.md, "Does per-image compute pay at all?").
    The weights spend its fine-tuning where it will answer, and it stays a network of its own
    (any image may still be sent to it), so the static comparison scores it alone too.
    """
    first_stage.eval()
    for p in first_stage.parameters():
        p.requires_grad_(False)
    keep = first_mask.bool().to(next(first_stage.parameters()).device)

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, keep_mask: torch.Tensor | None):
        logits = model(images) if keep_mask is None else model(images, keep_mask)
        with torch.no_grad():
            unsure = (1 - confidence(first_stage(images, keep.expand(images.shape[0], -1)))) ** power
            weight = unsure / unsure.mean().clamp_min(1e-12)
        per_image = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)
        return (per_image * weight).mean(), logits

    return loss_fn


def split_test_for_selection(networks: list[ScoredNetwork], labels: torch.Tensor, fraction: float,
                             seed: int) -> tuple[list[ScoredNetwork], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The networks re-scored for a choice made on test images: a random ``fraction`` of the
    test images (the same for every network) take the held-out images' place, the rest stay the
    test images. Returns (networks, selection labels, scoring labels, the scoring images'
    indices into the test split). For backbones trained on every training image (public
    checkpoints: torchvision's, akamaster's), whose held-out images they have already seen: a
    choice made there favours whichever network memorised more (docs/results.md, session 13)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(round(fraction * len(labels)))
    chosen, scored = order[:cut].sort().values, order[cut:].sort().values
    if len(chosen) == 0 or len(scored) == 0:
        raise ValueError(f"a selection fraction of {fraction} leaves no images on one side of {len(labels)}")
    split = [ScoredNetwork(n.name, n.flops_ratio, n.mask, n.test_logits[chosen], n.test_logits[scored])
             for n in networks]
    return split, labels[chosen], labels[scored], scored


def threshold_for_share(held_out_confidence: torch.Tensor, share: float) -> float:
    """The threshold under which ``share`` of the held-out images fall (they go on)."""
    if share <= 0:
        return float("-inf")
    if share >= 1:
        return float("inf")
    ranked = held_out_confidence.sort().values
    return ranked[min(int(round(share * len(ranked))), len(ranked) - 1)].item()


def averaged_probabilities(sender_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A last stage's averaged answer: its softmax and its sender's, averaged."""
    return (sender_logits.float().softmax(1) + logits.float().softmax(1)) / 2


def cascade_decisions(chain: list[ScoredNetwork], thresholds: list[float], held_out: bool = False,
                      average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction per image, the stage that answered it) of the cascade ``chain`` (cheapest
    first) with ``thresholds`` (one per stage but the last): an image leaves at the first stage
    whose top probability is at least that stage's threshold; the last stage answers the rest
    (with ``average``: by its probabilities averaged with those of the stage that sent it on)."""
    scored = [n.held_out if held_out else n.test for n in chain]
    stage = torch.full((len(scored[0][0]),), len(chain) - 1, dtype=torch.long)
    for i in reversed(range(len(chain) - 1)):
        stage = torch.where(scored[i][0] >= thresholds[i], i, stage)
    predictions = [p for _, p in scored]
    if average:
        sender, last = (n.held_out_logits if held_out else n.test_logits for n in chain[-2:])
        predictions[-1] = averaged_probabilities(sender, last).argmax(1)
    prediction = torch.stack(predictions).gather(0, stage[None]).squeeze(0)
    return prediction, stage


def cascade_flops(chain: list[ScoredNetwork], stage: torch.Tensor) -> float:
    """Mean FLOPs ratio per image: every network up to the one that answered it."""
    return stage_flops([n.flops_ratio for n in chain], stage)


def stage_flops(flops_ratios: list[float], stage: torch.Tensor) -> float:
    """Mean FLOPs ratio per image of a chain whose networks cost ``flops_ratios``, each image
    having run every network up to its ``stage``."""
    return float(sum(f * (stage >= i).double().mean().item() for i, f in enumerate(flops_ratios)))


def run_cascade(chain: list[ScoredNetwork], thresholds: list[float], labels: torch.Tensor,
                groups: torch.Tensor | None = None, group_names: list[str] | None = None, average: bool = False) -> dict:
    """The cascade on the test images: FLOPs ratio, accuracy, the share each stage answered, and
    its adaptivity (the blocks of every network it ran, cheapest first, as one mask)."""
    prediction, stage = cascade_decisions(chain, thresholds, average=average)
    correct = prediction == labels
    n = len(labels)
    blocks = torch.cat([net.mask.bool().expand(n, -1) & (stage >= i)[:, None] for i, net in enumerate(chain)], 1)
    return {
        "chain": [net.name for net in chain], "small": chain[0].name, "large": chain[-1].name, "thresholds": thresholds,
        "averaged": average,
        "flops_ratio": cascade_flops(chain, stage), "accuracy": correct.double().mean().item(),
        "sent_on": (stage > 0).double().mean().item(),
        "answered_by": [(stage == i).double().mean().item() for i in range(len(chain))],
        "adaptivity": adaptivity(blocks, correct, groups, group_names),
    }


#: Shares of the images that go on past the first stage, and of those past the second, tried for
#: three-network cascades (two networks need no search: the budget fixes the share).
SHARES = tuple(i / 20 for i in range(1, 13))


def candidate_chains(smalls: list[ScoredNetwork], large: ScoredNetwork, budget: float, stages: int,
                     average: bool = False) -> list[tuple[list[ScoredNetwork], list[float], torch.Tensor]]:
    """(chain, thresholds, held-out predictions) of every cascade into ``large`` of ``stages``
    networks (2 or 3) whose FLOPs on the held-out images are within ``budget``; thresholds from
    held-out quantiles."""
    found = []
    for small in smalls:
        if small.flops_ratio > budget:
            continue
        held_out_conf = small.held_out[0]
        if stages == 2:
            share = (budget - small.flops_ratio) / large.flops_ratio
            thresholds = [threshold_for_share(held_out_conf, share)]
            found.append(([small, large], thresholds,
                          cascade_decisions([small, large], thresholds, held_out=True, average=average)[0]))
            continue
        for middle in smalls:
            if middle.flops_ratio <= small.flops_ratio:
                continue
            middle_conf = middle.held_out[0]
            for first in SHARES:
                t1 = threshold_for_share(held_out_conf, first)
                on = held_out_conf < t1
                if not on.any():
                    continue
                for second in SHARES:
                    thresholds = [t1, threshold_for_share(middle_conf[on], second)]
                    prediction, stage = cascade_decisions([small, middle, large], thresholds, held_out=True,
                                                          average=average)
                    if cascade_flops([small, middle, large], stage) <= budget + 1e-9:
                        found.append(([small, middle, large], thresholds, prediction))
    return found


def cascade_for_budget(smalls: list[ScoredNetwork], large: ScoredNetwork, budget: float,
                       held_out_labels: torch.Tensor, labels: torch.Tensor,
                       groups: torch.Tensor | None = None, group_names: list[str] | None = None,
                       max_stages: int = 2, average: bool = False) -> dict | None:
    """The best cascade into ``large`` within ``budget`` (FLOPs ratio), chosen on the held-out
    images alone among the chains of 2 to ``max_stages`` networks (the small ones cheaper than the
    budget, thresholds as held-out quantiles), then scored on the test images. With ``average``
    the last stage's answer may also be its probabilities averaged with the sender's (chosen on
    the held-out images too). None when no small network fits the budget."""
    best = None
    for averaged in (False, True) if average else (False,):
        for stages in range(2, max_stages + 1):
            for chain, thresholds, prediction in candidate_chains(smalls, large, budget, stages, averaged):
                score = (prediction == held_out_labels).double().mean().item()
                if best is None or score > best[0]:
                    best = (score, chain, thresholds, averaged)
    if best is None:
        return None
    score, chain, thresholds, averaged = best
    return {"budget": budget, "held_out_accuracy": score,
            **run_cascade(chain, thresholds, labels, groups, group_names, averaged)}


def gain_standard_error(correct: torch.Tensor, static: dict, networks: dict[str, ScoredNetwork],
                        labels: torch.Tensor) -> float:
    """The standard error of a cascade's gain over the static envelope (:func:`static_envelope_at`'s
    ``static``), paired over the test images. ``correct``: the cascade's per-image correctness;
    ``networks``: the scored networks by name. The envelope's mixture answers image i right with
    probability (1 − w)·[A right on i] + w·[B right on i], so the gain is the mean of per-image
    differences d_i and its standard error std(d)/√n: the same images score both sides, which
    makes it several times tighter than the ~0.3 points of two independent accuracies on 10,000
    images (docs/results.md, session 12)."""
    mixture = static["mixture"]
    right = [(networks[name].test[1] == labels).double() for name in mixture["of"]]
    w = mixture.get("share_of_larger", 0.0)
    expected = right[0] if len(right) == 1 else (1 - w) * right[0] + w * right[1]
    differences = correct.double() - expected
    return (differences.std() / len(differences) ** 0.5).item()


def static_envelope_at(networks: list[ScoredNetwork], labels: torch.Tensor, flops_ratio: float) -> dict | None:
    """What static networks reach at ``flops_ratio`` without looking at the images: the best
    single network of at most that cost (``single``), and the best random mixture of two (each
    image sent to one of them with a fixed probability, so FLOPs and accuracy interpolate
    linearly; the upper hull of the static points, ``mixture``), which a cascade must beat for
    its per-image choice to count. None when no network is that cheap."""
    points = sorted((n.flops_ratio, (n.test[1] == labels).double().mean().item(), n.name) for n in networks)
    within = [p for p in points if p[0] <= flops_ratio + 1e-9]
    if not within:
        return None
    single = max(within, key=lambda p: p[1])
    mixture = {"accuracy": single[1], "of": [single[2]]}
    for fa, aa, na in within:
        for fb, ab, nb in points:
            if fb > flops_ratio > fa:
                w = (flops_ratio - fa) / (fb - fa)
                if (1 - w) * aa + w * ab > mixture["accuracy"]:
                    mixture = {"accuracy": (1 - w) * aa + w * ab, "of": [na, nb], "share_of_larger": w}
    return {"single": {"name": single[2], "flops_ratio": single[0], "accuracy": single[1]}, "mixture": mixture}


class CascadeModel(torch.nn.Module):
    """A cascade as one deployable model: ``forward(images)`` gives each image the logits of the
    stage that answered it. ``networks``: skippable backbones, cheapest first, each run with its
    keep mask of ``masks`` (all blocks where the mask is all ones) as the plain shorter network it
    is (``backbone.models.masked.FixedSubset``); ``thresholds``: one per stage but the last. A stage
    runs only on the rows still unanswered, gathered into one batch. ``average_last``: the last
    stage answers with its probabilities averaged with those of the stage that sent the image on
    (its output is then the log of those probabilities), as :func:`cascade_decisions` with ``average``.
    The networks may be different backbones (another run's, on the same inputs)."""

    def __init__(self, networks: list[torch.nn.Module], masks: list[torch.Tensor], thresholds: list[float],
                 average_last: bool = False):
        super().__init__()
        if not (len(networks) == len(masks) == len(thresholds) + 1 >= 2):
            raise ValueError(f"a cascade needs 2 or more networks, a mask each and a threshold for all but the last, got "
                             f"{len(networks)}, {len(masks)}, {len(thresholds)}")
        self.networks = torch.nn.ModuleList(networks)
        self.masks = [m.bool().cpu() for m in masks]
        # A stage with every block runs its plain forward; the others their fixed plan.
        self.stages = [net if bool(m.all()) else FixedSubset(net, m) for net, m in zip(networks, self.masks)]
        self.thresholds = list(thresholds)
        self.average_last = average_last

    def stage_logits(self, i: int, images: torch.Tensor) -> torch.Tensor:
        return self.stages[i](images)

    def _answer_of(self, i: int, images: torch.Tensor, sender_logits: torch.Tensor) -> torch.Tensor:
        logits = self.stage_logits(i, images)
        if self.average_last and i == len(self.stages) - 1:
            return averaged_probabilities(sender_logits, logits).log()
        return logits

    @torch.no_grad()
    def answer(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the stage that answered) per image."""
        if images.shape[0] == 1:
            logits, i = self.answer_one(images)
            return logits, torch.full((1,), i, dtype=torch.long, device=images.device)
        logits = self.stage_logits(0, images)
        stage = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        rows = None  # the rows still unanswered; None: all of them
        for i in range(1, len(self.networks)):
            unsure = confidence(logits if rows is None else logits[rows]) < self.thresholds[i - 1]
            going_on = int(unsure.sum())  # one host sync per stage
            if going_on == 0:
                break
            if rows is None and going_on == len(unsure):  # every image goes on: no gather, no scatter
                logits, stage = self._answer_of(i, images, logits), torch.full_like(stage, i)
                continue
            rows = (torch.arange(len(unsure), device=images.device) if rows is None else rows)[unsure]
            # logits[rows] still holds the sender's (the previous stage's) logits of these rows
            logits[rows] = self._answer_of(i, images[rows], logits[rows]).to(logits.dtype)
            stage[rows] = i
        return logits, stage

    @torch.no_grad()
    def answer_one(self, image: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(logits, the stage that answered) of a batch of one image, as a stream is served: per
        stage one confidence read to the host and nothing else (at batch 1 every small operator's
        fixed cost shows; docs/results.md, session 12)."""
        last = len(self.stages) - 1
        for i in range(last):
            logits = self.stage_logits(i, image)
            if confidence(logits).item() >= self.thresholds[i]:
                return logits, i
        return self._answer_of(last, image, logits), last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.answer_one(images)[0] if images.shape[0] == 1 else self.answer(images)[0]


def cascade_latency(cascade: CascadeModel, full: torch.nn.Module, images: torch.Tensor, flops_ratios: list[float],
                    batch: int, stream: int, repeats: int, device, warmup: int = 2) -> list[dict]:
    """Wall-clock of ``full`` (the full backbone) and of ``cascade`` on the same images: a stream
    of ``stream`` images one at a time (batch 1, as deployed) and one batch of ``batch``. Each row
    holds the FLOPs ratio (full ÷ cascade) of exactly those images (``flops_ratios``: each
    network's FLOPs over the full backbone's, summed over the stages an image reached), and
    ``efficiency`` = time ratio ÷ FLOPs ratio (1.0: every saved FLOP saved time); beside it the
    first network alone on every image (``first_stage_ms`` and its own efficiency), the part of
    the time that no cascade logic adds."""
    from backbone.models.cost import median_times

    rows = []
    for size in (1, batch):
        count = min(stream if size == 1 else size, len(images))
        chunks = images[:count].to(device).split(size)
        with torch.inference_mode():
            stages = torch.cat([cascade.answer(x)[1] for x in chunks]).cpu()
            times = median_times({"full": lambda: [full(x) for x in chunks], "cascade": lambda: [cascade(x) for x in chunks],
                                  "first": lambda: [cascade.stage_logits(0, x) for x in chunks]},
                                 device, warmup=warmup, repeats=repeats)
        flops = stage_flops(flops_ratios, stages)
        time_ratio = times["full"] / times["cascade"]
        rows.append({"batch": size, "images": count, "full_ms": times["full"] * 1e3 / len(chunks),
                     "cascade_ms": times["cascade"] * 1e3 / len(chunks), "time_ratio": time_ratio,
                     "flops_ratio": 1 / flops, "efficiency": time_ratio * flops,
                     "sent_on": (stages > 0).double().mean().item(), "dtype": "float32",
                     # Where it goes: the first network alone on every image, against its FLOPs.
                     "first_stage_ms": times["first"] * 1e3 / len(chunks),
                     "first_stage_efficiency": times["full"] / times["first"] * flops_ratios[0]})
    return rows
