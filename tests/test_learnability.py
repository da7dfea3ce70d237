"""Can the policies learn an input-adaptive optimum at all? A constructed task where they must.

A hand-built skippable network with two blocks and three classes: dark images are class 0,
bright images class 1. Without blocks every image is predicted class 2 (wrong). Block 0 writes
class-0 evidence, but only for dark images; block 1 writes class-1 evidence, only for bright
ones. So with λ per block, the per-image optimum runs block 0 on dark and block 1 on bright
images (reward 1 − λ each), while the best fixed mask, both blocks, earns 1 − 2λ and any single
block 0.5 − λ. A policy that reaches ≥ 90% of the oracle's reward and beats every fixed mask
must treat the two groups differently, and the test checks that it does. Also here: the
reward's own per-image optimum on a ladder (``experiments.probe.reward_optimum``).
"""

import pytest
import torch
import torch.nn as nn

from agents.adaptivity import adaptivity, log_adaptivity
from agents.evaluation import evaluate_policy_on
from agents.rl import PolicyConfig, make_skip_task, train_policy
from backbone.baselines import mask_table
from backbone.data.datasets import ImageDataset
from backbone.models.resnet import SkippableResNet

LAM = 0.2


class EvidenceBlock(nn.Module):
    """x + W x with a fixed 1x1 convolution: copies input channel ``source`` (2 for dark, 1 for
    bright) into evidence channel ``target`` (scaled by 2)."""

    downsamples = False

    def __init__(self, source: int, target: int):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[target, source] = 2.0

    def forward(self, x, gate=None):
        residual = self.conv(x)
        if gate is not None:
            residual = residual * gate.view(-1, 1, 1, 1)
        return x + residual

    def skip(self, x):
        return x


class TwoGroupNet(SkippableResNet):
    """Stem: channels [brightness − 0.5 (unused), bright, dark, 0]; head: logits (e3 − .5, e0 − .5, 0)."""

    def __init__(self):
        super().__init__()
        self.arch = {"num_classes": 3, "kind": "two-group test net"}
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[0, 3], self.fc.weight[1, 0] = 1.0, 1.0
            self.fc.bias.copy_(torch.tensor([-0.5, -0.5, 0.0]))
        self.block0, self.block1 = EvidenceBlock(2, 3), EvidenceBlock(1, 0)  # dark -> class 0, bright -> class 1
        self._blocks = (self.block0, self.block1)
        self.feature_dim = 4

    def stem(self, x):
        brightness = x.float().mean(dim=(1, 2, 3), keepdim=True) / 255
        bright = (brightness > 0.5).float().expand(-1, 1, 4, 4)
        return torch.cat([torch.zeros_like(bright), bright, 1 - bright, torch.zeros_like(bright)], 1)

    def head(self, h):
        return self.fc(h.mean(dim=(2, 3)))


def two_groups(n: int, seed: int) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)
    bright = torch.arange(n) % 2 == 1
    base = torch.where(bright, 190, 60).view(-1, 1, 1, 1)
    images = (base + torch.randint(-40, 41, (n, 3, 8, 8), generator=gen)).clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, bright.long(), ["dark", "bright", "neither"], bright.long(), "two-groups")


def test_the_constructed_optimum_depends_on_the_image():
    net, data = TwoGroupNet().eval(), two_groups(64, 0)
    rewards = {}
    for mask in mask_table(2):
        with torch.no_grad():
            correct = net(data.images, mask.expand(len(data), -1)).argmax(1) == data.labels
        rewards[tuple(mask.tolist())] = correct.float().mean().item() - LAM * int(mask.sum())
    assert rewards == pytest.approx({(False, False): 0.0, (True, False): 0.5 - LAM, (False, True): 0.5 - LAM,
                                     (True, True): 1 - 2 * LAM})
    per_image = torch.stack([data.labels == 0, data.labels == 1], 1)  # dark: block 0, bright: block 1
    with torch.no_grad():
        assert (net(data.images, per_image).argmax(1) == data.labels).all()


# Measured on seeds 0-6 (docs/results.md): the one-shot policy on stem features and the
# sequential policy learn the optimum every time with bounded exploration (α = 0.8, and a
# little more entropy for the sequential one, whose per-step credit is thinner); the one-shot
# policy on raw pixels (a small CNN from scratch) settles on the static "11" every time.
@pytest.mark.parametrize("env,observation,ent_coef,timesteps", [("oneshot", "stem", 0.01, 12_000),
                                                                ("sequential", "pixels", 0.03, 16_000)])
def test_policy_learns_the_input_adaptive_optimum(env, observation, ent_coef, timesteps, tmp_path):
    torch.manual_seed(0)
    net = TwoGroupNet().eval()
    cfg = PolicyConfig(env=env, observation=observation, reward={"kind": "linear", "lam": LAM}, num_envs=32, n_steps=4,
                       batch_size=64, timesteps=timesteps, learning_rate=3e-3, hidden=16, exploration_bound=0.8,
                       ent_coef=ent_coef, eval_every=10**9, checkpoint_every=10**9)
    task, test = make_skip_task(cfg, net, two_groups(256, 1)), make_skip_task(cfg, net, two_groups(128, 2))
    model, _ = train_policy(cfg, task, tmp_path, seed=0)
    m = evaluate_policy_on(model, test, env)
    oracle, best_fixed = 1 - LAM, 1 - 2 * LAM
    assert m["reward"] >= 0.9 * oracle and m["reward"] > best_fixed, m["top_masks"]
    dark, bright = (m["adaptivity"]["by_difficulty"][k] for k in ("level 0", "level 1"))
    assert dark["accuracy"] == bright["accuracy"] == 1.0
    masks = {t["mask"] for t in m["top_masks"] if t["share"] > 0.1}
    assert masks == {"10", "01"}, m["top_masks"]  # different blocks for the two groups


def test_adaptivity_measures_a_static_and_an_adaptive_policy():
    groups = torch.tensor([0, 0, 1, 1])
    static = adaptivity(torch.tensor([[1, 0], [1, 0], [1, 0], [1, 0]]).bool(), torch.ones(4).bool(), groups, ["a", "b"])
    assert static["distinct_masks"] == 1 and static["blocks_used_std"] == 0 and static["hard_minus_easy_blocks"] == 0
    probs = torch.tensor([[0.95, 0.2], [0.8, 0.05], [0.3, 0.95], [0.4, 0.7]])
    mixed = adaptivity(probs > 0.5, torch.tensor([1, 1, 0, 1]).bool(), groups, ["a", "b"], keep_prob=probs)
    assert mixed["distinct_masks"] == 2 and mixed["masks_covering_90pct"] == 2 and mixed["top_mask_share"] == 0.5
    assert mixed["by_difficulty"]["b"]["accuracy"] == 0.5 and mixed["blocks_histogram"] == [0, 4, 0]
    assert mixed["keep_prob"]["mean_per_block"] == pytest.approx([0.6125, 0.475])
    assert mixed["keep_prob"]["undecided_share"] == pytest.approx(5 / 8)
    many = adaptivity(torch.eye(10).bool(), torch.ones(10).bool())
    assert many["distinct_masks"] == 10 and many["masks_covering_90pct"] == 9


def test_adaptivity_reaches_tensorboard():
    logged = {}
    probs = torch.tensor([[0.95, 0.2], [0.8, 0.05], [0.3, 0.95], [0.4, 0.7]])
    result = {"adaptivity": adaptivity(probs > 0.5, torch.tensor([1, 1, 0, 1]).bool(), torch.tensor([0, 0, 1, 1]),
                                       ["easy", "hard"], keep_prob=probs)}
    log_adaptivity(lambda tag, value, step: logged.__setitem__(tag, value), "eval", result)
    assert logged["eval/distinct_masks"] == 2 and logged["eval/masks_covering_90pct"] == 2
    assert logged["eval/blocks_used/easy"] == 1.0 and logged["eval/accuracy/hard"] == 0.5
    assert logged["eval/blocks_used_per_image"].tolist() == [1.0, 1.0, 1.0, 1.0]  # one block each: a histogram
    assert len(logged["eval/keep_prob_std_across_images"]) == 2


def test_reward_optimum_gives_hopeless_images_the_cheapest_rung():
    from experiments.probe import reward_optimum
    ladder = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    correct = torch.tensor([[True, True, True, True],     # easy: right with nothing
                            [False, False, True, True],   # needs two blocks
                            [False, False, False, True],  # needs all three
                            [False, False, False, False]])  # hopeless
    groups = torch.tensor([0, 1, 1, 2])
    low = reward_optimum(correct, ladder, groups, lam=0.1)
    assert [g["blocks_used"] for g in low["by_group"]] == [0.0, 2.5, 0.0]
    assert low["accuracy"] == 0.75 and low["by_group"][2]["hopeless"] == 1.0
    # Above 1/3 per block the three-block image is no longer worth its blocks.
    high = reward_optimum(correct, ladder, groups, lam=0.4)
    assert [g["blocks_used"] for g in high["by_group"]] == [0.0, 1.0, 0.0] and high["accuracy"] == 0.5
    assert high["hard_minus_easy_blocks"] == 0.0
