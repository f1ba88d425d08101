"""Stage 3: parity with DDP, bytes per rank, the gathered window, tied weights, round trips."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from lightning_zero import ZeroConfig, ZeroEngine, model_state_bytes
from tests.test_parity import TOLERANCE, parity_case, tied_parity

CASES = [
    ("sgd", 1, "auto", None),
    ("sgd", 4, "boundary", None),
    ("sgd", 4, "every_micro_batch", ("norm", 0.5)),
    ("adamw", 4, "auto", None),
    ("adamw", 1, "auto", ("value", 0.01)),
]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_stage3_parity_with_ddp(pools, world_size: int) -> None:
    cases = CASES if world_size == 2 else CASES[1:4]
    failures = []
    for optimizer, accumulate, policy, clip in cases:
        result = pools(world_size).run(parity_case, 3, optimizer, accumulate, policy, clip, 150)[0]
        print(f"ws={world_size} stage 3 {optimizer} acc {accumulate} {policy} {clip}: "
              f"worst {result['worst_param']:.2e}, loss {result['worst_loss']:.2e}")
        if not (result["worst_param"] <= TOLERANCE and result["worst_loss"] <= TOLERANCE):
            failures.append((optimizer, accumulate, policy, clip, result))
    assert not failures, failures


def test_stage3_tied_weights_and_reused_layer(pools) -> None:
    errors = pools(3).run(tied_parity, 3)
    print(f"stage 3 tied: {max(errors):.2e}")
    assert max(errors) <= TOLERANCE


def test_stage3_parity_with_persistent_units(pools) -> None:
    """Some units left out as persistent (TinyNet's embed, norm and head; TiedNet's mix), the rest gathered
    at use, with the tied embedding and output layer gathered together."""
    result = pools(3).run(parity_case, 3, "adamw", 4, "boundary", None, 150, 200)[0]
    tied = max(pools(3).run(tied_parity, 3, 100))
    print(f"stage 3 with persistent units: worst {result['worst_param']:.2e}, tied {tied:.2e}")
    assert result["worst_param"] <= TOLERANCE and result["worst_loss"] <= TOLERANCE and tied <= TOLERANCE


class Blocks(torch.nn.Module):
    """Embedding, a stack of three MLP blocks, a final norm and an output layer tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(50, 16)  # 800
        self.layers = torch.nn.ModuleList(  # 2,128 each
            torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)) for _ in range(3)
        )
        self.norm = torch.nn.LayerNorm(16)  # 32
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(self.norm(h))


class Wrapper(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Blocks()


def test_units_keep_blocks_whole_open_stacks_and_persist_the_smallest() -> None:
    from lightning_zero.sharding.parameters import module_units

    model = Blocks()
    blocks = ("layers.0", "layers.1", "layers.2")
    assert module_units(model, 2**24, 0) == ("tokens", *blocks, "norm", "head")
    # a module holding the stack is opened up whatever its size; a block over unit_numel is opened up too
    assert module_units(Wrapper(), 2**24, 0) == tuple(f"model.{u}" for u in ("tokens", *blocks, "norm", "head"))
    assert module_units(model, 2000, 0)[1:3] == ("layers.0.0", "layers.0.2")
    # smallest first, up to the budget; the tied head (no weights of its own) only with the embedding
    assert module_units(model, 2**24, 831) == ("tokens", *blocks, "head")
    assert module_units(model, 2**24, 832) == blocks
    # automatic: the smaller of 2**17 and 1/64 of the model (7,216 // 64 = 112): the norm only
    assert module_units(model, 2**24, None) == ("tokens", *blocks, "head")
    # a Sequential of blocks is a stack too (timm's ``self.blocks``); a Sequential of Linear layers (an MLP)
    # or a ModuleList of them inside a small module (attention heads read directly) is not
    timm = torch.nn.Module()
    timm.blocks = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(3)))
    assert module_units(timm, 2**24, 0) == ("blocks.0", "blocks.1", "blocks.2")
    heads = torch.nn.Module()
    heads.attention = torch.nn.Module()
    heads.attention.heads = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    assert module_units(heads, 2**24, 0) == ("attention",)


def persistent_bytes() -> dict[str, int]:
    torch.manual_seed(0)
    model = Blocks()
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()), ZeroConfig(stage=3, persist_numel=832))
    gen = torch.Generator().manual_seed(dist.get_rank())
    model(torch.randint(0, 50, (4, 6), generator=gen)).square().mean().backward()
    engine.step()
    held = model_state_bytes(engine)
    from lightning_zero import estimate_memory

    estimate = estimate_memory(Blocks(), 3, dist.get_world_size(), "32-true", "adamw", persist_numel=832)
    out = {"world": dist.get_world_size(), "parameters": held.parameters, "gradients": held.gradients,
           "estimated_parameters": estimate.parameters,
           "gathered": sorted(engine.sharder.gathered), "persistent": sorted(engine.sharder.persistent)}
    engine.close()
    return out


@pytest.mark.parametrize("world_size", [3])
def test_persistent_units_hold_one_full_copy_and_shard_the_rest(pools, world_size: int) -> None:
    for got in pools(world_size).run(persistent_bytes):
        n = got["world"]
        shard = -(-2128 // n)  # each block's bucket, padded to a multiple of N, then split
        whole = -(-832 // n) * n  # the persistent bucket (tokens with the tied head, norm), padded
        print(f"N={n}: parameters {got['parameters']:,} bytes, gradients {got['gradients']:,}")
        assert got["gathered"] == got["persistent"] and len(got["persistent"]) == 1
        assert got["parameters"] == 4 * (3 * shard + whole)  # full copy of the persistent bucket, no extra shard
        assert got["gradients"] == 4 * (3 * shard + whole // n)  # gradients sharded everywhere
        assert 0 <= got["parameters"] - got["estimated_parameters"] <= 4 * 4 * n  # estimate_memory: padding apart


def stage3_bytes() -> dict[str, int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.GELU(), torch.nn.Linear(384, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, 64))
    psi = sum(p.numel() for p in model.parameters())
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()), ZeroConfig(stage=3))
    after_setup = model_state_bytes(engine).parameters
    model(torch.randn(4, 256)).square().mean().backward()
    engine.step()
    held = model_state_bytes(engine)
    gathered_after_step = engine.sharder.gathered
    engine.close()
    return {"psi": psi, "world": dist.get_world_size(), "total": held.total, "parameters": held.parameters,
            "after_setup": after_setup, "gathered": len(gathered_after_step), "in_flight": held.in_flight}


@pytest.mark.parametrize("world_size", [2, 4])
def test_stage3_bytes_per_rank_are_16_psi_over_n(pools, world_size: int) -> None:
    for got in pools(world_size).run(stage3_bytes):
        psi, n = got["psi"], got["world"]
        expected = 16 * psi / n
        print(f"stage 3 N={n}: {got['total']:,} bytes, 16Ψ/N = {expected:,.0f} ({got['total'] / expected - 1:+.3%})")
        assert got["gathered"] == 0 and got["in_flight"] == 0
        assert abs(got["after_setup"] - 4 * psi / n) <= 0.02 * 4 * psi / n  # never whole after setup
        assert abs(got["total"] - expected) <= 0.02 * expected


def gathered_parameters_access(stage: int) -> dict[str, object]:
    from tests.helpers import build_model, train_zero

    model = build_model()
    engine, _ = train_zero(model, "sgd", 2, ZeroConfig(stage=stage, bucket_numel=150))
    outside = model.head.weight.numel()
    with engine.gathered_parameters([model.head.weight]) as (weight,):
        whole = weight.detach().clone()
    with engine.gathered_parameters([model.head.weight, model.head.bias], modifier_rank=1):
        if dist.get_rank() == 1:
            with torch.no_grad():
                model.head.weight.fill_(0.25)
    with engine.gathered_parameters([model.head.weight]):
        after = model.head.weight.detach().clone()
    scale = model.scale.detach().clone()  # owned by the root: a persistent bucket under stage 3
    with engine.gathered_parameters([model.scale]):
        if dist.get_rank() == 0:
            with torch.no_grad():
                model.scale.fill_(7.0)
    engine.step()  # no gradients: the step leaves the weights alone and refreshes what stays gathered
    with engine.gathered_parameters([model.scale]):
        scale_kept = bool(torch.equal(model.scale, scale))
    engine.materialize_module()
    final = model.head.weight.detach().clone()
    state = engine.full_params()["head.weight"]
    engine.close()
    return {"outside": outside, "whole_shape": tuple(whole.shape), "after": float(after.mean()),
            "final": float(final.mean()), "state": float(state.mean()), "scale_kept": scale_kept}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gathered_parameters_read_and_write_back(pools, stage: int) -> None:
    for result in pools(3).run(gathered_parameters_access, stage):
        assert result["whole_shape"] == (3, 11)
        assert result["outside"] == (0 if stage == 3 else 33)  # stage 3: an empty tensor between uses
        assert result["after"] == result["final"] == result["state"] == 0.25
        if stage == 3:  # without modifier_rank, stage 3 discards changes, persistent parameters included
            assert result["scale_kept"]


class Checkpointed(torch.nn.Module):
    """TinyNet-like layers, the middle block recomputed in backward (non-reentrant checkpointing)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(7, 16)
        self.block = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.inp(x))
        h = checkpoint(self.block, h, use_reentrant=False)
        return self.out(h)


def checkpointing_parity(stage: int) -> float:
    import copy

    from torch.nn.parallel import DistributedDataParallel

    from tests.helpers import loss_of, relative_errors

    torch.manual_seed(0)
    model = Checkpointed()
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(reference)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    engine = ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                        ZeroConfig(stage=stage, bucket_numel=100))
    for step in range(10):
        loss_of(ddp, step, 0, 1).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        loss_of(model, step, 0, 1).backward()
        engine.step()
    engine.materialize_module()
    engine.close()
    return max(relative_errors(model, reference).values())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_activation_checkpointing_parity(pools, stage: int) -> None:
    worst = max(pools(2).run(checkpointing_parity, stage))
    print(f"activation checkpointing stage {stage}: {worst:.2e}")
    assert worst <= TOLERANCE


def traffic_per_step(stage: int) -> dict[str, float]:
    from lightning_zero.sharding import collectives

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 96),
                                torch.nn.GELU(), torch.nn.Linear(96, 8))
    psi = sum(p.numel() for p in model.parameters())
    engine = ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), ZeroConfig(stage=stage))
    model(torch.randn(4, 64)).square().mean().backward()  # warm-up step
    engine.step()
    collectives.traffic.clear()
    prefetched = engine.sharder.prefetch_count if engine.sharder else 0
    model(torch.randn(4, 64)).square().mean().backward()
    engine.step()
    moved = sum(collectives.traffic.values())
    prefetched = (engine.sharder.prefetch_count if engine.sharder else 0) - prefetched
    gathers = engine.sharder.gather_count if engine.sharder else 0
    engine.close()
    return {"ratio": moved / (2 * psi * 4), "detail": dict(collectives.traffic), "prefetched": prefetched,
            "gathers": gathers}


@pytest.mark.parametrize(("stage", "limit"), [(1, 1.0), (2, 1.0), (3, 1.5)])
def test_logical_traffic_per_step_against_ddp(pools, stage: int, limit: float) -> None:
    result = pools(2).run(traffic_per_step, stage)[0]
    print(f"stage {stage}: {result['ratio']:.4f}x DDP's 2Ψ fp32 all-reduce; {result['detail']}")
    # a per-parameter "had a gradient" flag (one byte each) rides along: allow that, nothing more
    assert result["ratio"] <= limit + 0.001
    if stage == 3:  # 3 units: forward prefetches units 2-3, backward units 2-1 of the second step
        print(f"prefetched {result['prefetched']} of the step's gathers")
        assert result["prefetched"] == 4


def bf16_stage3() -> float:
    from tests.test_precision import bf16_parity

    return bf16_parity(3, "adamw", 4, "boundary")


def test_stage3_bf16_mixed_matches_fp32_master_reference(pools) -> None:
    worst = max(pools(2).run(bf16_stage3))
    print(f"stage 3 bf16-mixed: {worst:.1e}")
    assert worst <= 1e-5


class Stack(torch.nn.Module):
    """Eight equal layers, re-initialised by ``apply`` in ``__init__`` (the GPT-2 pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(8))
        self.head = torch.nn.Linear(32, 4)
        self.apply(self._init)

    @staticmethod
    def _init(module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def sharded_init_matches_plain_init() -> dict[str, float]:
    from lightning_zero.sharding.init import sharded_init

    torch.manual_seed(0)
    plain = Stack()
    plain.apply(lambda m: torch.nn.init.zeros_(m.bias) if isinstance(m, torch.nn.Linear) else None)
    whole = sum(p.numel() * p.element_size() for p in plain.parameters())
    torch.manual_seed(0)
    with sharded_init() as state:
        model = Stack()
        model.apply(lambda m: torch.nn.init.zeros_(m.bias) if isinstance(m, torch.nn.Linear) else None)
    after_build = sum(p.numel() for p in model.parameters())
    engine = ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), ZeroConfig(stage=3))
    held = model_state_bytes(engine).parameters
    units = list(engine.units)
    engine.materialize_module()
    worst = max((p - q).abs().max().item() for p, q in zip(model.parameters(), plain.parameters()))
    engine.close()
    layer = 32 * 33 * 4
    return {"worst": worst, "peak": state.peak_bytes, "whole": whole, "layer": layer, "after_build": after_build,
            "held": held, "world": dist.get_world_size(), "units": units}


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_init_never_builds_the_whole_model(pools, world_size: int) -> None:
    for got in pools(world_size).run(sharded_init_matches_plain_init):
        n = got["world"]
        print(f"N={n}: peak while building {got['peak']:,} bytes of {got['whole']:,} "
              f"(1/N + one layer = {got['whole'] / n + got['layer']:,.0f}); max |init diff| {got['worst']}")
        assert got["worst"] == 0.0  # the same values as building the model plainly
        assert got["after_build"] == 0  # every parameter is an empty placeholder after building
        assert got["peak"] <= got["whole"] / n * 1.05 + got["layer"]
        # 1/N of everything but the head (132 elements, under the automatic persist_numel of 8,580 // 64)
        held = (got["whole"] - 132 * 4) / n + 132 * 4
        assert got["units"] == [f"layers.{i}" for i in range(8)]
        assert abs(got["held"] - held) <= 0.02 * held


class LitStack(pl.LightningModule):
    """``Stack`` built in ``configure_model()`` (sharded as it is built under zero3), random data per rank."""

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            torch.manual_seed(0)
            self.net = Stack()

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(batch_idx * 10 + dist.get_rank())
        return self.net(torch.randn(4, 32, generator=gen)).square().mean()


def configure_model_parity() -> float:
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_zero import ZeroStrategy
    from tests.helpers import relative_errors
    from tests.lit_helpers import trainer

    class Lit(LitStack):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    nets = {}
    for name, strategy in (("ddp", DDPStrategy()), ("zero3", ZeroStrategy(stage=3))):
        module = Lit()
        trainer(strategy, max_steps=5).fit(module, torch.utils.data.DataLoader(range(5), batch_size=None))
        nets[name] = module.net
    return max(relative_errors(nets["zero3"], nets["ddp"]).values())


def test_configure_model_under_zero3_matches_ddp(pools) -> None:
    worst = max(pools(2).run(configure_model_parity))
    print(f"configure_model + sharded init, 5 steps against ddp: {worst:.2e}")
    assert worst <= TOLERANCE


def review_regressions() -> dict[str, object]:
    """Cases found in review: a loss scale folded into every reduction, a reduction before the last
    micro-batch refused, and a write-back that changes nothing leaving fp32 masters bitwise alone."""
    from lightning_zero.config import PrecisionPolicy
    from tests.helpers import build_model, loss_of

    out: dict[str, object] = {}
    model = build_model()
    engine = ZeroEngine(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                        ZeroConfig(stage=2, bucket_numel=150))
    loss_of(model, 0, 0, 1).backward()
    plain = engine.grad_norm().item()
    engine.zero_grad()
    engine.loss_scale = 8.0
    (loss_of(model, 0, 0, 1) * 8.0).backward()
    out["scaled_norm_ratio"] = engine.grad_norm().item() / plain
    engine.zero_grad()
    engine.loss_scale = 1.0
    with engine.no_sync():
        loss_of(model, 0, 0, 2).backward()
    engine.grad_norm()
    try:
        loss_of(model, 0, 1, 2).backward()
        out["late_backward"] = "accepted"
    except RuntimeError as error:
        out["late_backward"] = str(error)
    engine.close()

    model = build_model()
    engine = ZeroEngine(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                        ZeroConfig(stage=2, bucket_numel=150),
                        dtypes=PrecisionPolicy.from_precision("bf16-mixed").slots())
    masters = {b.index: b.master.clone() for b in engine.trainable_buckets}
    with engine.gathered_parameters([model.scale], modifier_rank=0):
        pass
    out["masters_untouched"] = all(torch.equal(masters[b.index], b.master) for b in engine.trainable_buckets)
    engine.close()

    stray = build_model()
    try:
        ZeroEngine(stray, torch.optim.SGD(stray.head.parameters(), lr=0.1))
        out["outside"] = "accepted"
    except ValueError as error:
        out["outside"] = str(error)
    return out


def test_review_regressions(pools) -> None:
    for result in pools(2).run(review_regressions):
        assert result["scaled_norm_ratio"] == pytest.approx(1.0, rel=1e-5)
        assert "arrived after this step's gradients were reduced" in result["late_backward"]
        assert result["masters_untouched"]
        assert "no optimizer param group holds them" in result["outside"]


def stage3_configure_model_validate_and_resume(tmp: str) -> dict[str, float]:
    import os

    from lightning_zero import ZeroStrategy
    from tests.lit_helpers import trainer

    class Lit(LitStack):
        def validation_step(self, batch: object, batch_idx: int) -> None:
            self.log("val", self.net(torch.ones(2, 32)).square().mean(), sync_dist=True, batch_size=2)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(range(4), batch_size=None)
    checked = trainer(ZeroStrategy(stage=3)).validate(Lit(), data, verbose=False)[0]["val"]
    first = trainer(ZeroStrategy(stage=3), max_steps=2, max_epochs=3)
    first.fit(Lit(), data)
    path = os.path.join(tmp, "z3.ckpt")
    first.save_checkpoint(path)
    resumed = Lit()
    again = trainer(ZeroStrategy(stage=3), max_steps=4, max_epochs=3)
    again.fit(resumed, data, ckpt_path=path)
    straight = Lit()
    trainer(ZeroStrategy(stage=3), max_steps=4, max_epochs=3).fit(straight, data)
    worst = max((a - b).abs().max().item() for a, b in zip(resumed.parameters(), straight.parameters()))
    return {"validate": checked, "steps": again.global_step, "worst": worst}


def test_stage3_configure_model_validate_without_fit_and_resume(pools, tmp_path) -> None:
    for result in pools(2).run(stage3_configure_model_validate_and_resume, str(tmp_path)):
        assert result["validate"] > 0 and result["steps"] == 4
        assert result["worst"] <= 1e-6
