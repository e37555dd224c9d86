"""A tiny GLM-130B in the official SwissArmyTransformer layout, written from the published layout facts
(per-head QKV rows, [x1_rank; x2_rank] GeGLU rows, row-parallel columns, vocab-parallel embeddings), not by
glmkit.parallel.layout, so a wrong merge cannot hide behind a matching wrong split."""

import torch

from glmkit.models.config import GLMConfig

from tiny import random_model


def glm130b_state(config: GLMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp16 weights, as released. The block's output projections are scaled up so a tied random
    model does not just repeat its last token (which would make greedy decoding tests vacuous)."""
    model = random_model(config, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dense" in name and name.endswith("weight"):
                p.mul_(2)
    return {k: v.half() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def rank_slice(name: str, tensor: torch.Tensor, rank: int, world: int, inner: int) -> torch.Tensor:
    """Rank `rank`'s part, from the layout facts (written without glmkit.parallel.layout)."""
    if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):  # row-parallel: input columns
        cols = tensor.shape[1] // world
        return tensor[:, rank * cols:(rank + 1) * cols]
    if "dense_h_to_4h" in name:  # each rank: its rows of x1, then its rows of x2
        rows = inner // world
        x1, x2 = tensor[:inner], tensor[inner:]
        return torch.cat([x1[rank * rows:(rank + 1) * rows], x2[rank * rows:(rank + 1) * rows]])
    if "query_key_value" in name or name.endswith("word_embeddings.weight"):  # whole heads / vocab rows
        rows = tensor.shape[0] // world
        return tensor[rank * rows:(rank + 1) * rows]
    return tensor  # layer norms, row-parallel biases: every rank holds them


def write_sat(state: dict[str, torch.Tensor], config: GLMConfig, root, world: int, iteration: str = "49300"):
    """`latest` + <iteration>/mp_rank_XX_model_states.pt = {"module": ...}, with the per-layer rotary
    inv_freq buffers the release carries."""
    folder = root / iteration
    folder.mkdir(parents=True)
    (root / "latest").write_text(iteration)
    half = config.head_dim // 2
    inv_freq = (1.0 / 10000 ** (torch.arange(0, 2 * half, 2).float() / (2 * half))).half()
    for rank in range(world):
        module = {k: rank_slice(k, v, rank, world, config.inner_hidden_size).clone() for k, v in state.items()}
        for layer in range(config.num_layers):
            module[f"transformer.layers.{layer}.attention.rotary_emb.inv_freq"] = inv_freq
        torch.save({"module": module}, folder / f"mp_rank_{rank:02d}_model_states.pt")
    return root
