"""Shortening a batch of prompts to the visual tokens kept, for any model family whose prompt
holds one placeholder token per visual token.

`compact` drops the placeholders of dropped tokens from every row, re-pads the batch, and
builds the LLM's `inputs_embeds`: the text's embeddings with each image's kept vectors
gathered straight into its remaining placeholders. It reads one thing back from the device,
once per call: the new row lengths and where each image's kept placeholders land, which the
shapes depend on. `assign_rows` is the placeholder bookkeeping that precedes it: which prompt
row holds which image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from .checks import UsageError

IGNORE_INDEX = -100  # labels of padding added by compaction


@dataclass(frozen=True, eq=False)
class Compacted:
    """A batch of prompts shortened to the kept visual tokens."""

    input_ids: torch.Tensor  # (B, T') the shortened rows, re-padded
    attention_mask: torch.Tensor | None  # (B, T'); None where the caller gave none and no row was padded
    labels: torch.Tensor | None  # (B, T'), where the caller gave labels
    inputs_embeds: torch.Tensor  # (B, T', D) the text's embeddings, the kept vectors in their placeholders
    kept: list[torch.Tensor]  # each image's vectors as the LLM receives them
    keep_masks: list[torch.Tensor]  # each image's (L,) mask over its packed vectors: which it kept
    column: torch.Tensor  # (B, T) each original position's column in the short rows, T' where dropped

    def carry(self, values: torch.Tensor, fill) -> torch.Tensor:
        """(..., B, T) values per position of the original prompt -> (..., B, T') per position of
        the short one: kept positions take theirs, added padding takes `fill`."""
        return carry(values, self.column, self.input_ids.shape[1], fill)

    def llm_inputs(self) -> dict:
        """The LLM's keyword inputs: inputs_embeds and attention_mask, and labels where given."""
        inputs = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask}
        if self.labels is not None:
            inputs["labels"] = self.labels
        return inputs


def compact(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    keep_masks: list[torch.Tensor],
    packed: list[torch.Tensor],
    pad_side: str,
    pad_token_id: int,
    image_token_id: int,
    embedding: nn.Module,
) -> Compacted:
    """The prompt rows without the placeholders of dropped tokens, re-padded, with
    `inputs_embeds`: the text's embeddings (`embedding` of the ids) and image i's kept vectors
    (`packed[i][keep_masks[i]]`) in its remaining placeholders.

    Images are numbered in (row, position) order, as the models fill placeholders (the
    adapter has checked that the rows hold exactly those placeholders, `assign_rows`).
    Existing padding stays where it is; rows that became shorter get extra padding on
    `pad_side` (masked out, label -100). Reads one thing back from the device, once: the new
    row lengths and where each image's kept placeholders land, which the shapes depend on."""
    n_rows, n_images = len(input_ids), len(keep_masks)
    is_image = input_ids == image_token_id
    numbered = is_image.flatten().cumsum(0)  # placeholders up to each position of the flat prompt
    all_kept = torch.cat([input_ids.new_zeros(0, dtype=torch.bool), *keep_masks]).to(input_ids.device)
    keep = kept_columns(is_image, numbered, all_kept)
    kept_upto = keep.cumsum(1)
    sizes = [mask.numel() for mask in keep_masks]
    runs = image_runs(numbered, keep, kept_upto, sizes)
    read = torch.cat([kept_upto[:, -1], runs.flatten()]).tolist()  # the one sync
    rows = read[:n_rows]
    counts, first, last, before = (read[n_rows + n_images * i : n_rows + n_images * (i + 1)] for i in range(4))
    column, ids, mask, labels = repad(input_ids, attention_mask, labels, keep, kept_upto, rows, pad_side, pad_token_id)
    new_len, old_len = ids.shape[1], input_ids.shape[1]
    spans = []
    for size, count, start, end, ahead in zip(sizes, counts, first, last, before):
        if end - start + 1 != size:  # the image's placeholders are not one run
            spans.append(None)
            continue
        row = start // old_len
        at = row * new_len + ahead + (new_len - rows[row] if pad_side == "left" else 0)
        spans.append(slice(at, at + count))
    inputs_embeds, kept = embed_kept(ids, packed, keep_masks, counts, spans, image_token_id, embedding)
    return Compacted(ids, mask, labels, inputs_embeds, kept, keep_masks, column)


def embed_kept(ids, packed, keep_masks, counts: list[int], spans: list[slice | None], image_token_id, embedding):
    """(inputs_embeds for the shortened `ids`, each image's vectors in it): the text's
    embeddings, and image i's kept vectors gathered straight into its placeholders,
    `spans[i]` of the flattened prompt (None where other tokens split them: placed by
    position). Where a gradient must flow back, or the dtype or device differ, the vectors
    are gathered first and copied in (a gather into given memory carries no gradient)."""
    placeholders = (ids == image_token_id).flatten()
    text_at = torch.nonzero_static(~placeholders, size=ids.numel() - sum(counts))[:, 0]
    text = embedding(ids.flatten()[text_at])
    flat = text.new_empty(ids.numel(), text.shape[-1]).index_copy_(0, text_at.to(text.device), text)
    if None in spans:
        placeholders = placeholders.to(flat.device)
        positions = torch.nonzero_static(placeholders, size=sum(counts))[:, 0].split(counts)
        spans = [positions[i] if span is None else span for i, span in enumerate(spans)]
    tracked = torch.is_grad_enabled() and (flat.requires_grad or any(source.requires_grad for source in packed))
    kept = []
    for source, mask, count, where in zip(packed, keep_masks, counts, spans):
        rows = torch.nonzero_static(mask.to(source.device), size=count)[:, 0]
        if isinstance(where, slice) and not tracked and (source.dtype, source.device) == (flat.dtype, flat.device):
            kept.append(torch.index_select(source, 0, rows, out=flat[where]))
        else:
            kept.append(source.index_select(0, rows))
            flat[where] = kept[-1].to(flat.device, flat.dtype)
    return flat.view(*ids.shape, -1), kept


def kept_columns(is_image: torch.Tensor, numbered: torch.Tensor, all_kept: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: which prompt positions stay. `is_image`: the (B, T) placeholders;
    `numbered`: the flattened prompt's running count of them; `all_kept`: the images' packed
    keep masks one after another."""
    if not all_kept.numel():
        return torch.ones_like(is_image)
    ordinal = (numbered - 1).clamp(0, all_kept.numel() - 1).view_as(is_image)  # the placeholder's number
    return all_kept[ordinal] | ~is_image


def image_runs(numbered: torch.Tensor, keep: torch.Tensor, kept_upto: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(4, n_images) long, on the device: each image's kept count, the flat positions of its
    first and last placeholder in the prompt, and the positions its row keeps before the first
    (where its kept placeholders start in the shortened row, before re-padding). `numbered`:
    the flattened prompt's running count of placeholders; `keep` (B, T) and `kept_upto`, each
    row's running count of it; `sizes`: each image's placeholders."""
    bounds = torch.tensor(list(itertools.accumulate(sizes, initial=0)))
    bounds = bounds.to(numbered.device, non_blocking=True)  # from pageable memory: staged at once, no wait
    first = torch.searchsorted(numbered, bounds[:-1] + 1)
    last = torch.searchsorted(numbered, bounds[1:])
    keep, kept_upto = keep.flatten(), kept_upto.flatten()
    ahead = kept_upto[first] - keep[first].long()
    # an image lies in one row: what its row keeps from its first to its last placeholder,
    # less the text between them (all kept), where other tokens split its placeholders
    counts = kept_upto[last] - ahead - (last - first + 1 - bounds.diff())
    return torch.stack([counts, first, last, ahead])


def repad(input_ids, attention_mask, labels, keep, kept_upto, lengths: list[int], pad_side: str, pad_token_id: int):
    """Keep the `keep` (B, T) positions of every row and re-pad the batch, given each row's
    running count of them (`kept_upto`) and its total (`lengths`, read back once by `compact`).
    Existing padding stays where it is; rows that became shorter get extra padding on
    `pad_side` (masked out, label -100). Returns each position's column in the new rows (a
    spare one past their end where dropped), and the new input_ids, attention_mask (None
    where none is needed) and labels (None where none were given)."""
    new_len = max(lengths)
    # each kept position's column in the new row; dropped ones go to a spare column, cut off
    column = kept_upto - 1 + ((new_len - kept_upto[:, -1:]) if pad_side == "left" else 0)
    column.masked_fill_(~keep, new_len)
    ids = carry(input_ids, column, new_len, pad_token_id)
    mask = None
    if attention_mask is not None or min(lengths) != new_len:
        mask = carry(torch.ones_like(input_ids) if attention_mask is None else attention_mask, column, new_len, 0)
    if labels is not None:
        labels = carry(labels, column, new_len, IGNORE_INDEX)
    return column, ids, mask, labels


def carry(values: torch.Tensor, column: torch.Tensor, length: int, fill) -> torch.Tensor:
    """(..., B, T) values -> (..., B, length): each value at its `column` (B, T), `fill` elsewhere;
    a column of `length` (a dropped position) is cut off."""
    out = values.new_full((*values.shape[:-1], length + 1), fill)
    return out.scatter_(-1, column.to(values.device).expand_as(values), values)[..., :length]


def assign_rows(per_row: list[int], image_lengths: list[int]) -> list[int]:
    """The prompt row of every image, given each row's placeholder count and each image's
    placeholder count in order. Each row's placeholders must be exactly the lengths of whole
    images: the models themselves check only the batch total, which can silently move
    features between rows."""
    rows = []
    images = iter(image_lengths)
    for row, count in enumerate(per_row):
        need = 0
        while need < count:
            length = next(images, None)
            if length is None:
                break
            need += length
            rows.append(row)
        if need != count:
            raise UsageError(
                f"row {row} of input_ids has {count} image placeholder tokens, which does not match its "
                f"images' feature counts (images need {image_lengths} in order). Build the inputs with the "
                "model's own processor (the one loaded with it, e.g. AutoProcessor.from_pretrained) and one image "
                "per <image> in the text"
            )
    if next(images, None) is not None:
        raise UsageError(
            f"more images ({len(image_lengths)}) than <image> placeholders in the prompts; pass one image per <image>"
        )
    return rows
