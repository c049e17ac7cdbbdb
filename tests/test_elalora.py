"""ElaLoRA (adapters/elalora.py): the numbered tests of elalora.md (7's two-process half is in
test_schedules_distributed.py), resume mid-run, and a 4-bit base."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import fill_random, make_batch, output, tiny_llama, tiny_llama_4bit

import peftkit
from adapters.elalora import _unit_orthogonal, budget_at, step_generator  # noqa: E402  (peftkit.adapters)
from peftkit.inject import adapter_layers


class Toy(nn.Module):
    """A stack of fp64 linear layers with tanh between them."""

    def __init__(self, dims=(8, 8, 8, 6), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=torch.float64) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def toy(r=3, alpha=5.0, capacity=6, **options):
    model = Toy()
    return peftkit.wrap(model, "elalora", r=r, alpha=alpha, capacity=capacity, **options)


def branches(model):
    return [layer.adapters["default"] for layer in adapter_layers(model).values()]


def randomize(model, seed=1, std=0.3):
    """The toys are fp64: the fp64 draws are the tensors' own."""
    fill_random((p for branch in branches(model) for p in (branch.lora_A, branch.lora_E, branch.lora_B)), seed, std)


# ------------------------------------------------------------------------------------------ 1. forward
def test_noop_at_init_and_forward_formula():
    model = Toy()
    x = torch.randn(5, 8, dtype=torch.float64)
    base = model(x)
    peftkit.wrap(model, "elalora", r=3, alpha=5.0, capacity=5)
    assert torch.equal(model(x), base)  # E = 0: bit-exact
    randomize(model)
    layer = adapter_layers(model)["layers.0"]
    branch = layer.adapters["default"]
    assert branch.lora_mask.tolist() == [True, True, True, False, False]
    s = 5.0 / (3 + 1e-5)
    assert layer.scaling["default"] == s
    m = branch.lora_mask.double()
    delta = branch.lora_B @ torch.diag(branch.lora_E * m) @ branch.lora_A
    w, b = layer.base_layer.weight, layer.base_layer.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w.t() + b + s * x @ delta.t(), atol=1e-12, rtol=0)
        torch.testing.assert_close(layer.delta_weight("default"), s * delta, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------ 2. scores
def test_scores_match_hand_computed_emas():
    model = toy(beta1=0.7, beta2=0.6)
    schedule = peftkit.callbacks(model)
    gen = torch.Generator().manual_seed(3)
    b1, b2 = 0.7, 0.6
    hand = {}
    for _ in range(3):
        randomize(model, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
        for name, layer in schedule.layers:
            branch = layer.adapters["default"]
            for key in ("lora_A", "lora_E", "lora_B"):
                p = getattr(branch, key)
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                ipt = (p.detach() * p.grad).abs()
                avg, unc = hand.get((name, key), (torch.zeros_like(ipt), torch.zeros_like(ipt)))
                avg = b1 * avg + (1 - b1) * ipt
                unc = b2 * unc + (1 - b2) * (ipt - avg).abs()
                hand[(name, key)] = (avg, unc)
        schedule.update_scores()
    for name, layer in schedule.layers:
        off = ~layer.adapters["default"].lora_mask
        score = {}
        for key in ("lora_A", "lora_E", "lora_B"):
            avg, unc = hand[(name, key)]
            # inactive slots (3, 4, 5) keep zero EMAs
            avg, unc = avg.clone(), unc.clone()
            if key == "lora_A":
                avg[off], unc[off] = 0, 0
            elif key == "lora_B":
                avg[:, off], unc[:, off] = 0, 0
            else:
                avg[off], unc[off] = 0, 0
            torch.testing.assert_close(schedule.ema[f"{name}.{key}.ipt"], avg, atol=1e-12, rtol=0)
            torch.testing.assert_close(schedule.ema[f"{name}.{key}.unc"], unc, atol=1e-12, rtol=0)
            score[key] = avg * unc
        triplet = score["lora_E"] + score["lora_A"].mean(1) + score["lora_B"].mean(0)
        torch.testing.assert_close(schedule.triplet_scores(name), triplet, atol=1e-12, rtol=0)
        assert float(triplet[:3].min()) > 0


# ------------------------------------------------------------------------------------------ 3, 4, 8. one reallocation
KNOWN = [[5.0, 1.0, 9.0], [2.0, 8.0, 3.0], [7.0, 4.0, 6.0]]


def set_scores(schedule, scores):
    for (name, _), row in zip(schedule.layers, scores):
        for key in ("lora_A", "lora_E", "lora_B"):
            schedule.ema[f"{name}.{key}.ipt"].zero_()
            schedule.ema[f"{name}.{key}.unc"].zero_()
        schedule.ema[f"{name}.lora_E.ipt"][: len(row)] = torch.tensor(row, dtype=torch.float64)
        schedule.ema[f"{name}.lora_E.unc"][: len(row)] = 1.0


@pytest.mark.parametrize("capacity,ranks", [(6, [3, 1, 5]), (4, [3, 2, 4])])
def test_one_reallocation_with_known_scores(capacity, ranks):
    model = toy(capacity=capacity, budget=3, k=2)
    randomize(model)
    x = torch.randn(4, 8, dtype=torch.float64)
    opt = peftkit.optimizer(model, lr=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    model(x).pow(2).sum().backward()
    opt.step()
    lr_scheduler.step()
    schedule = peftkit.callbacks(model, optimizer=opt)
    set_scores(schedule, KNOWN)
    layers = [layer for _, layer in schedule.layers]
    deltas = [layer.delta_weight("default").detach().clone() for layer in layers]
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    prune, expand = schedule.plan(3)
    assert prune == [(0, 1), (1, 0), (1, 2)]  # the 3 lowest of the pooled k = 2 lowest per layer
    assert expand[:3] == [2, 0, 2]  # the 3 highest candidates' layers, with multiplicity
    record = schedule.reallocate(3, step=7)
    assert [b.rank for b in branches(model)] == ranks
    assert sum(ranks) == 9  # total rank constant
    assert record["pruned"] == [("layers.0", 1), ("layers.1", 0), ("layers.1", 2)]
    # 4. the output changes by exactly the removed triplets (the grown ones start at |e| <= 1e-13)
    s = layers[0].scaling["default"]
    for li, layer in enumerate(layers):
        removed = sum((s * triplet(params, schedule.layers[li][0], slot)
                       for lj, slot in prune if lj == li), torch.zeros_like(deltas[li]))
        torch.testing.assert_close(layer.delta_weight("default").detach(), deltas[li] - removed, atol=1e-12, rtol=0)
    for name, slot in record["grown"]:
        branch = adapter_layers(model)[name].adapters["default"]
        assert 0 <= float(branch.lora_E[slot].detach().abs()) <= 1e-13 and bool(branch.lora_mask[slot])
    # 8. every untouched slot and parameter keeps its Adam moments; touched slots start from zero; the LR
    # scheduler still drives the same optimizer.
    touched = {}
    for name, slot in record["pruned"] + record["grown"]:
        touched.setdefault(name, set()).add(slot)
    for name, layer in adapter_layers(model).items():
        branch = layer.adapters["default"]
        for key in ("lora_A", "lora_E", "lora_B"):
            p = getattr(branch, key)
            for moment in ("exp_avg", "exp_avg_sq"):
                new, old = opt.state[p][moment], moments[id(p)][moment]
                for slot in range(branch.lora_E.numel()):
                    index = (slice(None), slot) if key == "lora_B" else slot
                    if slot in touched.get(name, ()):
                        assert torch.count_nonzero(new[index]) == 0
                    else:
                        assert torch.equal(new[index], old[index])
            assert torch.equal(opt.state[p]["step"], moments[id(p)]["step"])
            for slot in range(branch.lora_E.numel()):  # the per-slot Adam counts restart at the touched slots
                expected = 0 if slot in touched.get(name, ()) else moments[id(p)]["slot_step"][slot]
                assert opt.state[p]["slot_step"][slot] == expected
    for n, p in model.named_parameters():
        if p.requires_grad and n.endswith("bias"):
            assert torch.equal(p, params[n])
    assert lr_scheduler.optimizer is opt
    lr_scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)


def triplet(params, name, slot):
    """e·p·qᵀ of one slot, from a copy of the parameters."""
    prefix = f"{name}.adapters.default."
    p, e, q = params[prefix + "lora_B"][:, slot], params[prefix + "lora_E"][slot], params[prefix + "lora_A"][slot]
    return e * torch.outer(p, q)


def test_grown_slot_steps_as_a_fresh_adamw_and_other_slots_as_torch_adamw():
    """After a reallocation at optimizer step 10, each grown slot (its row of Q, entry of E, column of P) takes
    exactly the steps of a fresh torch AdamW on that slot alone, for 4 steps; every other slot takes exactly the
    step torch's AdamW takes from the same state and gradient (weight decay on)."""
    lr, wd, steps = 2e-2, 0.1, 14
    model = toy(r=3, capacity=5, t_init=3, t_final=0, delta_t=6, budget=2, k=1, budget_scheduler=False)
    randomize(model, std=0.4)
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    ys = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    opt = peftkit.optimizer(model, lr=lr, weight_decay=wd)
    schedule = peftkit.callbacks(model, optimizer=opt)
    layers = adapter_layers(model)
    fresh = {}  # (layer, slot) -> (torch AdamW on the slot alone, its q, e, p)
    grown_e, first_moves = {}, []
    checked_steps = 0
    for step in range(1, steps + 1):
        (model(xs) - ys).pow(2).mean().backward()
        # torch's AdamW from this state and gradient, tensor by tensor: what every non-grown slot must do.
        expected = {}
        for name, layer in layers.items():
            for key in ("lora_A", "lora_E", "lora_B"):
                param = getattr(layer.adapters["default"], key)
                copy = param.detach().clone().requires_grad_(True)
                copy.grad = param.grad.clone()
                reference = torch.optim.AdamW([copy], lr=lr, weight_decay=wd if param.ndim >= 2 else 0.0)
                if param in opt.state:
                    state = opt.state[param]
                    reference.state[copy] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"].clone(),
                                             "exp_avg_sq": state["exp_avg_sq"].clone()}
                reference.step()
                expected[(name, key)] = copy.detach()
        for (name, slot), (reference, q, e, p) in fresh.items():
            branch = layers[name].adapters["default"]
            q.grad = branch.lora_A.grad[slot].clone()
            e.grad = branch.lora_E.grad[slot:slot + 1].clone()
            p.grad = branch.lora_B.grad[:, slot].clone()
            reference.step()
        opt.step()
        for name, layer in layers.items():
            branch = layer.adapters["default"]
            grown = {slot for (n, slot) in fresh if n == name}
            keep = [i for i in range(branch.lora_E.numel()) if i not in grown]
            for key, got in (("lora_A", branch.lora_A[keep]), ("lora_E", branch.lora_E[keep]),
                             ("lora_B", branch.lora_B[:, keep])):
                want = expected[(name, key)][:, keep] if key == "lora_B" else expected[(name, key)][keep]
                torch.testing.assert_close(got.detach(), want, atol=1e-15, rtol=1e-12, msg=f"{name}.{key}")
            for slot in grown:
                _, q, e, p = fresh[(name, slot)]
                if step == 11:
                    first_moves.append(abs(float(e.detach()) - grown_e[(name, slot)]))
                torch.testing.assert_close(branch.lora_A[slot].detach(), q.detach(), atol=1e-15, rtol=1e-12)
                torch.testing.assert_close(branch.lora_E[slot:slot + 1].detach(), e.detach(), atol=1e-15, rtol=1e-12)
                torch.testing.assert_close(branch.lora_B[:, slot].detach(), p.detach(), atol=1e-15, rtol=1e-12)
                checked_steps += 1
        schedule.on_step(step, steps)
        if schedule.history and schedule.history[-1]["step"] == step:
            assert step == 10 and len(schedule.history) == 1
            for name, slot in schedule.history[-1]["grown"]:
                branch = layers[name].adapters["default"]
                q = branch.lora_A[slot].detach().clone().requires_grad_(True)
                e = branch.lora_E[slot:slot + 1].detach().clone().requires_grad_(True)
                p = branch.lora_B[:, slot].detach().clone().requires_grad_(True)
                reference = torch.optim.AdamW([{"params": [q, p], "weight_decay": wd},
                                               {"params": [e], "weight_decay": 0.0}], lr=lr)
                fresh[(name, slot)] = (reference, q, e, p)
                grown_e[(name, slot)] = float(e.detach())
        opt.zero_grad(set_to_none=True)
    assert len(fresh) == 2 and checked_steps == 2 * 4
    # Fresh Adam's first step moves the grown e (|g| ≫ ε, no decay on E) by lr, not by 0.48·lr.
    for move in first_moves:
        assert move == pytest.approx(lr, rel=1e-5)


def test_reallocation_without_an_optimizer_is_an_error():
    model = toy(budget=1, k=1)
    schedule = peftkit.callbacks(model)
    with pytest.raises(peftkit.StateError, match="attach_optimizer"):
        schedule.reallocate(1, step=3)


# ------------------------------------------------------------------------------------------ 5. new vectors
def test_new_vectors_unit_and_orthogonal():
    gen = torch.Generator().manual_seed(0)
    orthonormal = torch.linalg.qr(torch.randn(20, 5, generator=gen, dtype=torch.float64))[0].t()
    rough = torch.randn(5, 20, generator=gen, dtype=torch.float64) * 0.02
    for rows, method, bound in ((orthonormal, "reference", 1e-6), (orthonormal, "qr", 1e-6), (rough, "qr", 1e-6)):
        q = _unit_orthogonal(rows, torch.randn(20, generator=gen, dtype=torch.float64), method)
        assert abs(float(q.norm()) - 1) <= 1e-12
        assert float((rows @ q).abs().max()) <= bound, method
    # The reference rule is an exact projection only for orthonormal rows (elalora.md): not for N(0, 0.02²) rows.
    q = _unit_orthogonal(rough, torch.randn(20, generator=gen, dtype=torch.float64), "reference")
    assert float((rough @ q).abs().max()) > 1e-6
    # Through the schedule, grown slots are unit vectors orthogonal to the layer's active rows (qr option).
    model = toy(capacity=6, budget=3, k=2, new_vectors="qr")
    randomize(model)
    twin = copy.deepcopy(model)
    opt = peftkit.optimizer(model, lr=1e-2)
    schedule = peftkit.callbacks(model, optimizer=opt)
    set_scores(schedule, KNOWN)
    global_rng = torch.get_rng_state()
    record = schedule.reallocate(3, step=5)
    assert torch.equal(torch.get_rng_state(), global_rng)  # the global RNG is untouched
    for name, slot in record["grown"]:
        branch = adapter_layers(model)[name].adapters["default"]
        others = branch.lora_mask.clone()
        others[slot] = False
        q, p = branch.lora_A[slot].detach(), branch.lora_B[:, slot].detach()
        assert abs(float(q.norm()) - 1) <= 1e-12 and abs(float(p.norm()) - 1) <= 1e-12
        assert float((branch.lora_A[others].detach() @ q).abs().max()) <= 1e-6
        assert float((branch.lora_B[:, others].detach().t() @ p).abs().max()) <= 1e-6
    # (seed, step) decides the draws: the same model at the same step grows the same vectors, at another step others.
    grown = {(name, slot): (adapter_layers(model)[name].adapters["default"].lora_A[slot].detach(),
                            adapter_layers(model)[name].adapters["default"].lora_B[:, slot].detach())
             for name, slot in record["grown"]}
    assert grown
    for step, same in ((5, True), (6, False)):
        other = copy.deepcopy(twin)
        other_schedule = peftkit.callbacks(other, optimizer=peftkit.optimizer(other, lr=1e-2))
        set_scores(other_schedule, KNOWN)
        assert other_schedule.reallocate(3, step=step)["grown"] == record["grown"]  # the scores decide the slots
        for (name, slot), (q, p) in grown.items():
            branch = adapter_layers(other)[name].adapters["default"]
            drawn = (branch.lora_A[slot].detach(), branch.lora_B[:, slot].detach())
            assert (torch.equal(drawn[0], q) and torch.equal(drawn[1], p)) == same, (step, name, slot)


# ------------------------------------------------------------------------------------------ 6. b(t)
def test_budget_schedule_and_phases():
    options = dict(budget=4, t_init=100, t_final=200, budget_scheduler=True)
    values = {t: budget_at(t, 1000, options) for t in range(1000)}
    assert values[101] == 4 and values[400] == 4 and values[500] == 3 and values[700] == 1 and values[800] == 0
    for t in range(101, 800):
        p = (t - 100) / 700
        assert values[t] == round(4 * (1 - p ** 3))
    # The measured sequence (elalora.md), every 100 steps after t_init: 4 until 400, then 3, 1, and 0 at 800.
    assert [budget_at(t, 1000, options) for t in range(200, 801, 100)] == [4, 4, 4, 3, 3, 1, 0]
    assert budget_at(900, 1000, dict(options, budget_scheduler=False)) == 4
    # Reallocations only for t_init < t < T − t_final, every delta_t, with b(t) > 0; no score updates at the end.
    model = toy(t_init=3, t_final=4, delta_t=2, budget=4, k=1)
    schedule = peftkit.callbacks(model)
    calls, updates = [], []
    schedule.reallocate = lambda budget, step: calls.append((step - 1, budget))
    schedule.update_scores = lambda: updates.append(schedule.step)
    for step in range(1, 21):
        schedule.on_step(step, 20)
    assert [t for t, _ in calls] == [5, 7, 9, 11, 13, 15]  # t = 5 .. 15 < T − t_final = 16
    assert updates == list(range(1, 17))


# ------------------------------------------------------------------------------------------ 7. masked == physical
def physical_run(masked_model, xs, ys, steps, lr, opts, seed, gamma, capacity):
    """Reference: ElaLoRA with physically resized P, E, Q (rows deleted, triplets appended), hand Adam."""
    layers = []
    for layer in adapter_layers(masked_model).values():
        br = layer.adapters["default"]
        r = br.rank
        layers.append(dict(W=layer.base_layer.weight.detach(), b=layer.base_layer.bias.detach(),
                           s=layer.scaling["default"],
                           t={"Q": br.lora_A.detach()[:r].clone(), "E": br.lora_E.detach()[:r].clone(),
                              "P": br.lora_B.detach()[:, :r].clone()}))
    for lay in layers:
        lay["m"] = {k: torch.zeros_like(v) for k, v in lay["t"].items()}
        lay["v"] = {k: torch.zeros_like(v) for k, v in lay["t"].items()}
        lay["n"] = {k: torch.zeros_like(v) for k, v in lay["t"].items()}  # Adam steps taken, per entry
        lay["ipt"] = {k: torch.zeros_like(v) for k, v in lay["t"].items()}
        lay["unc"] = {k: torch.zeros_like(v) for k, v in lay["t"].items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    L = len(layers)
    losses = []
    for step in range(1, steps + 1):
        for lay in layers:
            for v in lay["t"].values():
                v.requires_grad_(True)
        h = xs
        reg = 0.0
        for i, lay in enumerate(layers):
            t = lay["t"]
            h = h @ lay["W"].t() + lay["b"] + lay["s"] * ((h @ t["Q"].t()) * t["E"]) @ t["P"].t()
            if i < L - 1:
                h = torch.tanh(h)
            eye = torch.eye(t["Q"].shape[0], dtype=torch.float64)
            reg = (reg + torch.linalg.matrix_norm(t["Q"] @ t["Q"].t() - eye)
                   + torch.linalg.matrix_norm(t["P"].t() @ t["P"] - eye))
        loss = (h - ys).pow(2).mean() + gamma / (2 * L) * reg
        losses.append(float(loss.detach()))
        loss.backward()
        with torch.no_grad():
            for lay in layers:
                for k, p in lay["t"].items():
                    g = p.grad
                    n = lay["n"][k].add_(1)  # a grown triplet is a new tensor: its own fresh Adam
                    lay["m"][k].mul_(b1).add_(g, alpha=1 - b1)
                    lay["v"][k].mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (lay["v"][k].sqrt() / (1 - b2 ** n).sqrt()).add_(eps)
                    p.sub_(lr / (1 - b1 ** n) * lay["m"][k] / denom)
            t_ = step - 1
            if t_ < steps - opts["t_final"]:
                for lay in layers:
                    for k, p in lay["t"].items():
                        ipt = (p * p.grad).abs()
                        lay["ipt"][k] = opts["beta1"] * lay["ipt"][k] + (1 - opts["beta1"]) * ipt
                        lay["unc"][k] = (opts["beta2"] * lay["unc"][k]
                                         + (1 - opts["beta2"]) * (ipt - lay["ipt"][k]).abs())
                budget = budget_at(t_, steps, opts)
                if t_ > opts["t_init"] and (t_ - opts["t_init"]) % opts["delta_t"] == 0 and budget > 0:
                    physical_reallocate(layers, budget, opts, step_generator(seed, step), capacity)
        for lay in layers:
            for v in lay["t"].values():
                v.grad = None
                v.requires_grad_(False)
    return layers, losses


def physical_reallocate(layers, budget, opts, gen, capacity):
    pool = []
    for li, lay in enumerate(layers):
        sc = {k: lay["ipt"][k] * lay["unc"][k] for k in ("Q", "E", "P")}
        score = (sc["E"] + sc["Q"].mean(1) + sc["P"].mean(0)).tolist()
        k_l = min(opts["k"], len(score) - 1)
        pool += [(score[i], li, i) for i in sorted(range(len(score)), key=lambda i: (score[i], i))[:k_l]]
    pool.sort()
    budget = min(budget, len(pool))
    prune = pool[:budget]
    expand = [li for _, li, _ in sorted(pool, key=lambda c: (-c[0], c[1], c[2]))]
    for li in range(len(layers)):
        keep = [i for i in range(layers[li]["t"]["E"].numel()) if (li, i) not in {(c[1], c[2]) for c in prune}]
        for table in ("t", "m", "v", "n", "ipt", "unc"):
            d = layers[li][table]
            d["Q"], d["E"], d["P"] = d["Q"][keep], d["E"][keep], d["P"][:, keep]
    grown = 0
    for li in expand:
        if grown == budget:
            break
        lay = layers[li]
        t = lay["t"]
        if t["E"].numel() >= capacity:
            continue
        g = torch.randn(t["Q"].shape[1], generator=gen, dtype=torch.float64)
        g2 = torch.randn(t["P"].shape[0], generator=gen, dtype=torch.float64)
        q = g - t["Q"].t() @ (t["Q"] @ g)
        p = g2 - t["P"] @ (t["P"].t() @ g2)
        e = min(float(t["E"].abs().min()), 1e-13)
        new = {"Q": (q / q.norm())[None, :], "E": torch.tensor([e], dtype=torch.float64), "P": (p / p.norm())[:, None]}
        for table in ("t", "m", "v", "n", "ipt", "unc"):
            d = lay[table]
            for k, dim in (("Q", 0), ("E", 0), ("P", 1)):
                d[k] = torch.cat([d[k], new[k] if table == "t" else torch.zeros_like(new[k])], dim)
        grown += 1


def test_masked_equals_physical_resize_reference():
    opts = dict(t_init=1, t_final=2, delta_t=2, budget=2, k=2, beta1=0.85, beta2=0.85, budget_scheduler=True)
    steps, lr, gamma, capacity = 12, 0.05, 0.1, 5
    model = toy(r=3, capacity=capacity, orth_reg_weight=gamma, **opts)
    with torch.no_grad():
        for branch in branches(model):
            branch.lora_A.normal_(0, 0.3)
            branch.lora_B.normal_(0, 0.3)
    gen = torch.Generator().manual_seed(5)
    xs = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    ys = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    layers, ref_losses = physical_run(model, xs, ys, steps, lr, opts, 0, gamma, capacity)
    opt = peftkit.optimizer(model, lr=lr)  # the preset's AdamW, one step count per slot
    schedule = peftkit.callbacks(model, optimizer=opt)
    losses = []
    for step in range(1, steps + 1):
        loss = (model(xs) - ys).pow(2).mean() + peftkit.regularization_loss(model)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        schedule.on_step(step, steps)
        opt.zero_grad(set_to_none=True)
    assert len(schedule.history) == 4 and any(r["pruned"] for r in schedule.history)
    ranks = [b.rank for b in branches(model)]
    assert ranks == [lay["t"]["E"].numel() for lay in layers]
    assert ranks != [3, 3, 3] and sum(ranks) == 9  # ranks moved, the total did not
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-10, rtol=0)
    for layer, lay in zip(adapter_layers(model).values(), layers):
        t = lay["t"]
        torch.testing.assert_close(layer.delta_weight("default").detach(),
                                   lay["s"] * (t["P"] * t["E"]) @ t["Q"], atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------ 9. export
def train_llama(model, steps, opt, schedule, start=1, total=None, seed=0):
    total = total or steps
    for step in range(start, start + steps):
        batch = make_batch(model, batch_size=2, seq_len=8, seed=seed + step)
        loss = model(**batch).loss + peftkit.regularization_loss(model)
        loss.backward()
        opt.step()
        schedule.on_step(step, total)
        opt.zero_grad(set_to_none=True)


ELA_OPTS = dict(r=4, alpha=8, capacity=8, t_init=0, t_final=0, delta_t=1, budget=3, k=2)


def test_export_with_per_layer_ranks_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = peftkit.wrap(tiny_llama(), "elalora", targets=["q_proj", "v_proj", "down_proj"], **ELA_OPTS)
    model.train()
    opt = peftkit.optimizer(model, lr=5e-2)
    train_llama(model, 4, opt, peftkit.callbacks(model, optimizer=opt), total=10)
    ranks = {n: l.adapters["default"].rank for n, l in adapter_layers(model).items()}
    assert len(set(ranks.values())) > 1 and sum(ranks.values()) == 4 * len(ranks)
    model.eval()
    batch = make_batch(model, seed=99)
    ours = output(model, batch)
    peftkit.export(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    for name, module in peft_model.named_modules():
        if name.endswith(("q_proj", "v_proj", "down_proj")) and hasattr(module, "lora_A"):
            key = name.split("base_model.model.", 1)[1]
            assert module.lora_A["default"].weight.shape[0] == ranks[key]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, ours, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ 10. first order
def test_first_order_update_matches_closed_form():
    torch.manual_seed(0)
    base = nn.Linear(7, 5, dtype=torch.float64)
    model = nn.Sequential(base)
    peftkit.wrap(model, "elalora", r=3, alpha=4.0, capacity=4, orth_reg_weight=0.0)
    layer = adapter_layers(model)["0"]
    branch = layer.adapters["default"]
    with torch.no_grad():
        branch.lora_A.normal_()
        branch.lora_B.normal_()
        branch.lora_E.normal_()
        branch.lora_mask[1] = False  # an inactive slot must not move ΔW
    x = torch.randn(9, 7, dtype=torch.float64)
    target = torch.randn(9, 5, dtype=torch.float64)
    s = layer.scaling["default"]
    w_eff = (base.weight + layer.delta_weight("default")).detach().requires_grad_(True)
    loss = 0.5 * (x @ w_eff.t() + base.bias - target).pow(2).sum()
    (g,) = torch.autograd.grad(loss, w_eff)
    p, q = branch.lora_B.detach(), branch.lora_A.detach()
    lam = torch.diag(branch.lora_E.detach() * branch.lora_mask.double())
    diag = torch.diag(branch.lora_mask.double() * torch.diagonal(p.t() @ g @ q.t()))
    predicted = s ** 2 * (p @ lam @ lam @ p.t() @ g + g @ q.t() @ lam @ lam @ q + p @ diag @ q)
    start = {k: v.detach().clone() for k, v in branch.named_parameters()}
    errors = []
    for eta in (1e-4, 5e-5):
        with torch.no_grad():
            for k, v in branch.named_parameters():
                v.copy_(start[k])
        before = layer.delta_weight("default").detach().clone()
        opt = torch.optim.SGD(branch.parameters(), lr=eta)
        (0.5 * (model(x) - target).pow(2).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        change = layer.delta_weight("default").detach() - before
        errors.append(float((change / -eta - predicted).norm() / predicted.norm()))
    assert errors[0] < 0.05 and 1.8 < errors[0] / errors[1] < 2.2, errors


# ------------------------------------------------------------------------------------------ resume, 4-bit
def test_resume_mid_run_equals_uninterrupted(tmp_path):
    def fresh():
        model = peftkit.wrap(tiny_llama(), "elalora", targets=["q_proj", "v_proj"], **ELA_OPTS)
        return model.train()

    def lr_sched(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + 0.5 * step))

    def run(model, opt, sched, schedule, start, steps):
        for step in range(start, start + steps):
            batch = make_batch(model, seed=step)
            (model(**batch).loss + peftkit.regularization_loss(model)).backward()
            opt.step()
            sched.step()
            schedule.on_step(step, 8)
            opt.zero_grad(set_to_none=True)

    full = fresh()
    full_opt = opt = peftkit.optimizer(full, lr=3e-2)
    sched, schedule = lr_sched(opt), peftkit.callbacks(full, optimizer=opt)
    run(full, opt, sched, schedule, 1, 6)

    first = fresh()
    opt = peftkit.optimizer(first, lr=3e-2)
    sched, schedule = lr_sched(opt), peftkit.callbacks(first, optimizer=opt)
    run(first, opt, sched, schedule, 1, 3)
    peftkit.save(first, tmp_path)
    torch.save({"optimizer": opt.state_dict(), "lr": sched.state_dict(), "schedule": schedule.state_dict()},
               tmp_path / "state.pt")
    resumed = peftkit.load(tiny_llama(), tmp_path, trainable=True).train()
    states = torch.load(tmp_path / "state.pt")
    opt = peftkit.optimizer(resumed, lr=3e-2)
    sched = lr_sched(opt)  # before the optimizer state: LambdaLR's constructor resets the group lr
    opt.load_state_dict(states["optimizer"])
    sched.load_state_dict(states["lr"])
    schedule = peftkit.callbacks(resumed, optimizer=opt)
    schedule.load_state_dict(states["schedule"])
    run(resumed, opt, sched, schedule, 4, 3)
    got = dict(resumed.named_parameters())
    for name, param in full.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(got[name], param, atol=1e-6, rtol=0, msg=name)
    for (name, layer), (_, other) in zip(adapter_layers(full).items(), adapter_layers(resumed).items()):
        assert torch.equal(layer.adapters["default"].lora_mask, other.adapters["default"].lora_mask), name
        # The per-slot Adam counts went through the optimizer state dict (fp64, not cast to the param dtype).
        for key in ("lora_A", "lora_E", "lora_B"):
            ours, theirs = (o.state[getattr(l.adapters["default"], key)]["slot_step"]
                            for o, l in ((full_opt, layer), (opt, other)))
            assert theirs.dtype == torch.float64 and torch.equal(ours, theirs), (name, key)
            assert bool((ours < 6).any())  # some slot was reset by a reallocation


def test_four_bit_base_trains_and_reallocates():
    model = tiny_llama_4bit()
    batch = make_batch(model, seed=5)
    base = output(model, batch)
    peftkit.wrap(model, "elalora", targets=["q_proj", "v_proj", "down_proj"], **ELA_OPTS)
    torch.testing.assert_close(output(model, batch), base, atol=0, rtol=0)
    # Dense weights, not stored bytes: on bitsandbytes' CPU-packed path the layout changes with train/eval.
    weights = {n: l.base_weight() for n, l in adapter_layers(model).items()}
    model.train()
    opt = peftkit.optimizer(model, lr=5e-2)
    schedule = peftkit.callbacks(model, optimizer=opt)
    train_llama(model, 3, opt, schedule, total=10)
    ranks = schedule.ranks()
    assert schedule.history and len(set(ranks.values())) > 1 and sum(ranks.values()) == 4 * len(ranks)
    for name, layer in adapter_layers(model).items():
        assert torch.equal(layer.base_weight(), weights[name])
    model.eval()
    assert torch.isfinite(output(model, batch)).all() and not torch.equal(output(model, batch), base)
