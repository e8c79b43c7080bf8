"""Multimodal rope positions for Qwen2-VL / Qwen2.5-VL samples with images (3 rows: temporal, height, width)."""

import torch


def get_rope_index(spatial_merge_size, input_ids, image_grid_thw, *, image_token_id, vision_start_token_id):
    """input_ids (L,) -> position_ids (3, 1, L). Text advances all rows by one; an image's tokens take
    (t, h, w) offsets from the position after its start token; the text after it continues past the largest."""
    ids = input_ids.tolist()
    rows, current, i, image = [], 0, 0, 0
    while i < len(ids):
        if ids[i] == vision_start_token_id and i + 1 < len(ids) and ids[i + 1] == image_token_id:
            rows.append([current] * 3)
            current += 1
            t, h, w = (int(v) for v in image_grid_thw[image])
            h, w = h // spatial_merge_size, w // spatial_merge_size
            for tt in range(t):
                for hh in range(h):
                    for ww in range(w):
                        rows.append([current + tt, current + hh, current + ww])
            current += max(t, h, w)
            i += 1 + t * h * w
            image += 1
        else:
            rows.append([current] * 3)
            current += 1
            i += 1
    return torch.tensor(rows, dtype=torch.long).T.unsqueeze(1)
