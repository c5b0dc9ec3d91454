"""Independent re-computations for the tests, written from the method definitions in
shared/reference/methods.md with plain loops, sharing no code with tokendrop's selection."""

from __future__ import annotations

import math

import torch
from transformers.image_processing_utils import select_best_resolution

from tokendrop.adapters import adapter_for


def geometry(model, height, width):
    """(side, n_h, n_w, (y0, y1, x0, x1)) of an image, from the LLaVA-NeXT definitions."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    best_h, best_w = select_best_resolution((height, width), model.config.image_grid_pinpoints)
    n_h, n_w = best_h // vision.image_size, best_w // vision.image_size
    cur_h, cur_w = n_h * side, n_w * side
    y0, y1, x0, x1 = 0, cur_h, 0, cur_w
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        y0, y1 = pad, cur_h - pad
    else:
        new_w = int(round(width * (cur_h / height), 7))
        pad = (cur_w - new_w) // 2
        x0, x1 = pad, cur_w - pad
    return side, n_h, n_w, (y0, y1, x0, x1)


def features(model, height, width):
    """[(partition, local)] of every feature token in packed order, and the packed sequence as
    a list of ('f', feature_index) / ('nl', row) entries."""
    side, n_h, n_w, (y0, y1, x0, x1) = geometry(model, height, width)
    feats = [(0, j) for j in range(side * side)]
    packed = [("f", j) for j in range(side * side)]
    for row, y in enumerate(range(y0, y1)):
        for x in range(x0, x1):
            packed.append(("f", len(feats)))
            feats.append((1 + (y // side) * n_w + x // side, (y % side) * side + x % side))
        packed.append(("nl", row))
    return feats, packed


def keep_mask(model, height, width, indices, newlines):
    """Packed keep mask for kept feature `indices` under a newline policy."""
    feats, packed = features(model, height, width)
    side, n_h, n_w, (y0, y1, x0, x1) = geometry(model, height, width)
    kept = set(indices)
    rows_with_kept = {(i - side * side) // (x1 - x0) for i in kept if i >= side * side}
    mask = []
    for kind, value in packed:
        if kind == "f":
            mask.append(value in kept)
        else:
            # "rows": a row loses its newline only when all its features were dropped; the rows
            # of a zero-width canvas (a very thin image) hold none and keep theirs
            mask.append(newlines == "all" or (newlines == "rows" and (value in rows_with_kept or x1 == x0)))
    return torch.tensor(mask)


def region_weights(model, height, width):
    """w[c][j]: area share of base patch j covered by crop c's unpadded content."""
    side, n_h, n_w, (y0, y1, x0, x1) = geometry(model, height, width)
    weights = []
    for i in range(n_h):
        for j in range(n_w):
            top, bottom = (max(i * side, y0) - y0) * side / (y1 - y0), (min((i + 1) * side, y1) - y0) * side / (y1 - y0)
            left, right = (max(j * side, x0) - x0) * side / (x1 - x0), (min((j + 1) * side, x1) - x0) * side / (x1 - x0)
            w = []
            for a in range(side):
                for b in range(side):
                    dy = max(0.0, min(a + 1, bottom) - max(a, top))
                    dx = max(0.0, min(b + 1, right) - max(b, left))
                    w.append(dy * dx)
            weights.append(w)
    return weights


def allocate(total, weights, capacity):
    """Proportional shares, each capped at its capacity, overflow redistributed, rounding
    remainder to the largest fractional parts (ties: lower index)."""
    n = len(weights)
    alloc = [0] * n
    remaining = min(total, sum(capacity))
    while remaining > 0:
        open_ = [p for p in range(n) if alloc[p] < capacity[p]]
        w = {p: max(0.0, float(weights[p])) for p in open_}
        if sum(w.values()) <= 0:
            w = {p: float(capacity[p] - alloc[p]) for p in open_}
        total_w = sum(w.values())
        share = {p: remaining * w[p] / total_w for p in open_}
        full = [p for p in open_ if math.floor(share[p]) >= capacity[p] - alloc[p]]
        if full:
            for p in full:
                remaining -= capacity[p] - alloc[p]
                alloc[p] = capacity[p]
            continue
        for p in open_:
            alloc[p] += math.floor(share[p])
            remaining -= math.floor(share[p])
        for p in sorted(open_, key=lambda p: (-(share[p] - math.floor(share[p])), p))[:remaining]:
            alloc[p] += 1
        remaining = 0
    return alloc


def top_per_partition(scores, partition_of, counts):
    kept = []
    for p, count in enumerate(counts):
        members = [i for i in range(len(scores)) if partition_of[i] == p]
        members.sort(key=lambda i: (-scores[i], i))
        kept += members[:count]
    return sorted(kept)


def keep_count(budget, n):
    if isinstance(budget, int):
        return min(n, budget)
    return min(n, max(1, math.floor(budget * n + 1e-9)))


def eager_cls_attention(eager_model, pixel_values, image_sizes, layer):
    """Head-summed CLS attention probabilities (CLS column dropped) of every partition, from
    eager attention maps: a list over images of (P, side**2)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = eager_model.config
    counts = [
        image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
        for s in image_sizes.tolist()
    ]
    real = torch.cat([pv[:c] for pv, c in zip(pixel_values, counts)])
    with torch.no_grad():
        out = eager_model.model.vision_tower(real, output_attentions=True)
    probs = out.attentions[layer][:, :, 0, 1:].sum(1).float()
    return list(probs.split(counts))


def hired(eager_model, pixel_values, image_sizes, budget, alpha=0.5, alloc_layer=0, select_layer=-2):
    """HiRED, paper Eq. 1 with 2-D padding-aware regions and exact budgets."""
    allocs = eager_cls_attention(eager_model, pixel_values, image_sizes, alloc_layer)
    selects = eager_cls_attention(eager_model, pixel_values, image_sizes, select_layer)
    result = []
    for (height, width), alloc_attn, select_attn in zip(image_sizes.tolist(), allocs, selects):
        feats, _ = features(eager_model, height, width)
        n = len(feats)
        k = keep_count(budget, n)
        n_parts = alloc_attn.shape[0]
        capacity = [sum(1 for p, _ in feats if p == q) for q in range(n_parts)]
        n_base = min(math.floor(alpha * k + 1e-9), capacity[0])
        mass = [
            sum(w * float(a) for w, a in zip(weights, alloc_attn[0]))
            for weights in region_weights(eager_model, height, width)
        ]
        crops = allocate(k - n_base, mass, capacity[1:])
        counts = [k - sum(crops)] + crops
        scores = [float(select_attn[p, j]) for p, j in feats]
        result.append(top_per_partition(scores, [p for p, _ in feats], counts))
    return result


def embed_prompt(model, input_ids, features_per_image):
    """inputs_embeds by hand: token embeddings with the image placeholders overwritten, in
    order, by the given feature vectors."""
    embeds = model.get_input_embeddings()(input_ids).clone()
    slots = (input_ids == model.config.image_token_id).nonzero().tolist()
    vectors = torch.cat(features_per_image) if features_per_image else embeds.new_zeros(0, embeds.shape[-1])
    assert len(slots) == vectors.shape[0]
    for (row, col), vector in zip(slots, vectors):
        embeds[row, col] = vector
    return embeds


def greedy_no_cache(model, embeds, steps):
    """Greedy decoding of one prompt by full forward passes, no KV cache."""
    tokens = []
    embed = model.get_input_embeddings()
    with torch.no_grad():
        for _ in range(steps):
            hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            token = model.lm_head(hidden[:, -1]).argmax(-1)
            tokens.append(int(token))
            embeds = torch.cat([embeds, embed(token)[:, None]], dim=1)
    return tokens


def compact_batch(model, batch, records, newlines="rows", labels=None):
    """Left-padded prompts without the placeholders of dropped tokens, the kept feature
    vectors of the unpatched model, and labels compacted alike (-100 on added padding)."""
    with torch.no_grad():
        packed = adapter_for(model).image_features(batch["pixel_values"], batch["image_sizes"])
    token = model.config.image_token_id
    masks = [
        keep_mask(model, height, width, record.indices, newlines)
        for (height, width), record in zip(batch["image_sizes"].tolist(), records)
    ]
    kept = [features[mask] for features, mask in zip(packed, masks)]
    masks = iter(masks)
    rows = []
    for row, ids in enumerate(batch["input_ids"]):
        keep = torch.ones_like(ids, dtype=torch.bool)
        slots = (ids == token).nonzero().flatten()
        if len(slots):
            row_mask = []
            while len(row_mask) < len(slots):
                row_mask += next(masks).tolist()
            keep[slots[~torch.tensor(row_mask)]] = False
        row_labels = labels[row][keep] if labels is not None else None
        rows.append((ids[keep], batch["attention_mask"][row][keep], row_labels))
    width = max(len(ids) for ids, _, _ in rows)

    def left_pad(tensors, fill):
        return torch.stack([torch.cat([t.new_full((width - len(t),), fill), t]) for t in tensors])

    out = {
        "input_ids": left_pad([r[0] for r in rows], 0),
        "attention_mask": left_pad([r[1] for r in rows], 0),
        "features": kept,
    }
    if labels is not None:
        out["labels"] = left_pad([r[2] for r in rows], -100)
    return out


def cls_logits(model, pixel_values, image_sizes, layer):
    """Head-mean CLS-query logits before softmax (CLS column dropped) of every partition,
    computed by hand from the layer's input hidden state: list over images of (P, side**2)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    counts = [
        image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
        for s in image_sizes.tolist()
    ]
    real = torch.cat([pv[:c] for pv, c in zip(pixel_values, counts)])
    tower = model.model.vision_tower
    layers = tower.vision_model.encoder.layers if hasattr(tower, "vision_model") else tower.encoder.layers
    layer = layer % len(layers)
    with torch.no_grad():
        hidden = tower(real, output_hidden_states=True).hidden_states[layer]
        block = layers[layer]
        normed = block.layer_norm1(hidden)
        heads = block.self_attn.num_heads
        q = block.self_attn.q_proj(normed)[:, 0].view(len(real), heads, -1)
        k = block.self_attn.k_proj(normed).view(len(real), normed.shape[1], heads, -1)
        logits = (q[:, None] * k).sum(-1) / math.sqrt(q.shape[-1])  # (B, L, heads)
    return list(logits.mean(-1)[:, 1:].float().split(counts))


def bilinear(grid, out_h, out_w):
    """Resize a square list-of-lists grid, half-pixel centres (align_corners=False)."""
    n = len(grid)

    def coord(i, out):
        src = max((i + 0.5) * n / out - 0.5, 0.0)
        lo = min(int(math.floor(src)), n - 1)
        return lo, min(lo + 1, n - 1), src - lo

    result = []
    for y in range(out_h):
        y0, y1, fy = coord(y, out_h)
        row = []
        for x in range(out_w):
            x0, x1, fx = coord(x, out_w)
            top = grid[y0][x0] * (1 - fx) + grid[y0][x1] * fx
            bottom = grid[y1][x0] * (1 - fx) + grid[y1][x1] * fx
            row.append(top * (1 - fy) + bottom * fy)
        result.append(row)
    return result


def globalcom2(model, pixel_values, image_sizes, budget, tau=10.0, layer=-1):
    result = []
    for (height, width), logits in zip(image_sizes.tolist(), cls_logits(model, pixel_values, image_sizes, layer)):
        side, n_h, n_w, (y0, y1, x0, x1) = geometry(model, height, width)
        feats, _ = features(model, height, width)
        n = len(feats)
        k = keep_count(budget, n)
        ratio = k / n
        capacity = [sum(1 for p, _ in feats if p == q) for q in range(1 + n_h * n_w)]
        n_base = min(math.floor(ratio * side * side + 1e-9), capacity[0])
        base = [float(v) for v in logits[0]]
        sums = [sum(w * b for w, b in zip(weights, base)) for weights in region_weights(model, height, width)]
        top = max(sums)
        exps = [math.exp((s - top) / tau) for s in sums]
        sigma = [e / sum(exps) for e in exps]
        ratios = [min(1.0, ratio * (1 + s - 1 / len(sigma))) for s in sigma]
        crops = allocate(k - n_base, [r * c for r, c in zip(ratios, capacity[1:])], capacity[1:])
        counts = [k - sum(crops)] + crops
        global_map = bilinear([base[r * side : (r + 1) * side] for r in range(side)], y1 - y0, x1 - x0)
        local, global_ = [], []
        for index, (p, j) in enumerate(feats):
            local.append(float(logits[p, j]))
            if p == 0:
                global_.append(0.0)
            else:
                i = index - side * side
                global_.append(global_map[i // (x1 - x0)][i % (x1 - x0)])
        scores = []
        for index, (p, _) in enumerate(feats):
            if p == 0:
                scores.append(local[index])
                continue
            members = [i for i, (q, _) in enumerate(feats) if q == p]
            local_norm = math.sqrt(sum(local[i] ** 2 for i in members))
            global_norm = math.sqrt(sum(global_[i] ** 2 for i in members))
            scores.append(local[index] / local_norm + global_[index] / global_norm)
        result.append(top_per_partition(scores, [p for p, _ in feats], counts))
    return result


def text_scores(model, processor, features_of_image, question):
    """s_i = sum_j cos(v_i, x_j) over the question's token embeddings."""
    tokenizer = processor.tokenizer
    ids = [i for i in tokenizer(question, add_special_tokens=False).input_ids if i not in tokenizer.all_special_ids]
    table = model.get_input_embeddings().weight.detach().float()
    scores = []
    for v in features_of_image.float():
        scores.append(sum(float(torch.dot(v, table[i]) / (v.norm() * table[i].norm())) for i in ids))
    return scores


def text_select(model, processor, batch, questions, budget=None, threshold=None, scope="crops"):
    with torch.no_grad():
        packed = adapter_for(model).image_features(batch["pixel_values"], batch["image_sizes"])
    result = []
    for (height, width), features_, question in zip(batch["image_sizes"].tolist(), packed, questions):
        feats, layout = features(model, height, width)
        vectors = torch.stack([features_[pos] for pos, (kind, _) in enumerate(layout) if kind == "f"])
        scores = text_scores(model, processor, vectors, question)
        candidates = [i for i, (p, _) in enumerate(feats) if p > 0 or scope == "all"]
        ranked = sorted(candidates, key=lambda i: (-scores[i], i))
        if threshold is None:
            count = keep_count(budget, len(candidates))
        else:
            top = max(scores[i] for i in candidates)
            weights = [math.exp(scores[i] - top) for i in ranked]
            total, mass, count = sum(weights), 0.0, 0
            for w in weights:
                mass += w / total
                if mass > threshold:
                    break
                count += 1
            count = min(len(candidates), count + 1)
        always = [i for i, (p, _) in enumerate(feats) if p == 0 and scope == "crops"]
        result.append(sorted(always + ranked[:count]))
    return result
