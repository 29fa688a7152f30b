"""Regenerates tests/golden: valid frames, the tables they use, and one hand-made bad frame per rejection rule.

Run ``python -m tests.golden.make_golden`` only together with a FORMAT_VERSION bump (STYLE §7): the frames and
their SHA-256 values are the format's fixed points, asserted by tests/unit/test_format_golden.py, by the C++
test kernels/tests/test_golden.cpp and quoted in FORMAT.md Appendix A.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import torch

from cachegen.codec import calibrate, encode
from cachegen.spec import KVLayout

HERE = Path(__file__).parent
TINY = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="bfloat16", tokens_per_chunk=32)
SMALL = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", tokens_per_chunk=32)
MODEL = b"golden"


def small_kv(num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(SMALL.shape(num_tokens), generator=generator)
    kv[:, 0, :, :, 5] *= 6  # a key outlier channel
    return kv.bfloat16()


def reseal(frame: bytearray) -> bytes:
    """Recompute both CRCs after an edit, so the frame reaches the deeper checks."""
    head = 48 + frame[15] + 16 * struct.unpack_from("<H", frame, 28)[0]
    struct.pack_into("<I", frame, head, zlib.crc32(bytes(frame[:head])))
    struct.pack_into("<I", frame, len(frame) - 4, zlib.crc32(bytes(frame[head + 4 : -4])))
    return bytes(frame)


def edited(frame: bytes, offset: int, fmt: str, value: int, seal: bool) -> bytes:
    data = bytearray(frame)
    struct.pack_into(fmt, data, offset if offset >= 0 else len(data) + offset, value)
    return reseal(data) if seal else bytes(data)


def build() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expectation): "ok", "mismatch", or the FormatError field a decoder must report."""
    raw = encode(torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 0.25, -1.0, 8.0] * 2).bfloat16().reshape(TINY.shape(2)),
                 TINY, MODEL, level=0, token_start=256)  # fmt: skip
    tables = calibrate([small_kv(64, 1), small_kv(64, 2)], SMALL, MODEL)
    kv = small_kv(40, 3)  # one full 32-token stream block and an 8-token tail block per head
    lossless = encode(kv, SMALL, MODEL, level=1, tables=tables)
    q32 = encode(kv, SMALL, MODEL, level=3, tables=tables)
    words_end = len(q32) - 4
    pca_tables = _per_coefficient(calibrate(_samples(), SMALL, MODEL, transform=_tiny_transform()))
    pca2 = encode(kv, SMALL, MODEL, level=7, tables=pca_tables)  # token_start 0: tokens 0-3 escaped (sinks)
    pca2t_tables = _per_coefficient(calibrate(_samples(), SMALL, MODEL, transform=_full_transform()))
    pca2t = encode(kv, SMALL, MODEL, level=8, tables=pca2t_tables)  # classes 4-10 occur; tokens 0-3 escaped
    pca2x_tables = calibrate(_samples(), SMALL, MODEL, transform=_cross_layer_transform())
    pca2x = encode(kv, SMALL, MODEL, level=9, tables=pca2x_tables)  # tokens 0-3 escaped
    return {
        "raw_tiny.bin": (raw, "ok"),
        "tables_small.cgct": (tables.to_bytes(), "tables"),
        "small_kv.bin": (kv.view(torch.int16).numpy().tobytes(), "values"),
        "lossless_small.bin": (lossless, "ok"),
        "q32_small.bin": (q32, "ok"),
        "q32_small_decoded.bin": (b"", "values"),  # filled in by the writer from the reference decoder
        "bad_magic.bin": (b"CGKX" + raw[4:], "magic"),
        "bad_version.bin": (edited(raw, 4, "<H", 2, False), "version"),
        "bad_truncated.bin": (raw[:-1], "section.size"),
        "bad_header_crc.bin": (edited(raw, 24, "<I", 3, False), "header_crc32"),
        "bad_payload_crc.bin": (edited(raw, 80, "<B", 0x55, False), "payload_crc32"),
        "bad_reserved.bin": (edited(raw, 30, "<H", 1, True), "reserved"),
        "bad_level.bin": (edited(raw, 6, "<B", 200, True), "level"),
        "bad_num_tokens.bin": (edited(raw, 24, "<I", 1 << 20, True), "num_tokens"),
        "bad_raw_size.bin": (edited(raw, 24, "<I", 3, True), "section.size"),
        "bad_trailing.bin": (raw + b"\0", "frame_size"),
        "bad_stream_sizes.bin": (edited(q32, _sizes_offset(q32), "<I", 0xFFFFFFFF, True), "stream_sizes"),
        "bad_rans_state.bin": (edited(q32, words_end - 8, "<I", 0x12345, True), "rans_final_state"),
        "wrong_model.bin": (encode(kv, SMALL, b"other", level=0), "mismatch"),
        # Levels 6-7 (FORMAT.md §5.5): their decode is exact only to f32 rounding, so "transform" entries are
        # checked within a tolerance, by the Python tests and the C++ golden test alike.
        "tables_small_pca.cgct": (pca_tables.to_bytes(), "tables"),
        "pca2_small.bin": (pca2, "transform"),
        "pca2_small_decoded.bin": (b"", "values"),  # filled in by the writer from the reference decoder
        "transform_bad_escapes.bin": (edited(pca2, _section_offset(pca2, 1), "<I", 41, True), "escapes"),
        # Level 8 (FORMAT.md §5.6): the same KV with a step class per (layer, token), coded with tables that have
        # the level's 96-row ladder and the probe record (§8.2). L T = 80 is even, so TOKEN_CLASSES has no padding.
        "tables_small_pca2t.cgct": (pca2t_tables.to_bytes(), "tables"),
        "pca2t_small.bin": (pca2t, "transform"),
        "pca2t_small_decoded.bin": (b"", "values"),  # filled in by the writer from the reference decoder
        "transform_bad_classes_size.bin": (_grown_section(pca2t, 2), "section.size"),  # TOKEN_CLASSES 41 bytes
        # Level 9 (FORMAT.md §5.7): the same KV predicted layer from layer with the tables' cross-layer record
        # (§8.3), designed on KV whose layers follow each other, so a decoder that drops the prediction is far off.
        "tables_small_pca2x.cgct": (pca2x_tables.to_bytes(), "tables"),
        "pca2x_small.bin": (pca2x, "transform"),
        "pca2x_small_decoded.bin": (b"", "values"),  # filled in by the writer from the reference decoder
    }


def _sizes_offset(frame: bytes) -> int:
    return _section_offset(frame, -2)


def _section_offset(frame: bytes, index: int) -> int:
    from cachegen.codec.bitstream import parse_frame

    return parse_frame(frame).sections[index].offset


def _grown_section(frame: bytes, index: int) -> bytes:
    """The frame with one zero byte appended to section ``index`` (its table size too), resealed: a container
    that parses, with a section one byte longer than its level prescribes (FORMAT.md §6 rule 6)."""
    from cachegen.codec.bitstream import parse_frame

    section = parse_frame(frame).sections[index]
    data = bytearray(frame[: section.offset + section.size] + b"\0" + frame[section.offset + section.size :])
    entry = 48 + data[15] + 16 * index
    struct.pack_into("<Q", data, entry + 8, section.size + 1)
    return reseal(data)


def _samples() -> list[torch.Tensor]:
    return [small_kv(64, 1), small_kv(64, 2)]


def _per_coefficient(tables):
    """``tables`` with levels 6-7 given one table per coefficient, as calibration made them when these files were
    written (it now gives them level 8's ladder, FORMAT.md §8). Both are valid; the files keep the older map, so
    decoders are held to any ``table_map``, not only the ladder."""
    import dataclasses

    import numpy as np

    from cachegen.codec.calibrate import PSEUDO_COUNT, level_symbols
    from cachegen.codec.coded import table_ids
    from cachegen.codec.rans import Tables
    from cachegen.codec.tables import freq_from_counts

    def own_tables(entry):
        table_map = np.arange(entry.table_map.size, dtype=np.uint32).reshape(entry.table_map.shape)
        counts = np.zeros((table_map.size, 255), np.float64)
        for kv in _samples():
            symbols, _ = level_symbols(kv, entry.level, None, tables.transform)
            ids = table_ids(table_map, None, symbols.shape)
            counts += np.bincount((ids * 255 + symbols).ravel(), minlength=counts.size).reshape(counts.shape)
        return dataclasses.replace(entry, table_map=table_map, tables=Tables(freq_from_counts(counts + PSEUDO_COUNT)))

    levels = tuple(own_tables(entry) if entry.level in (6, 7) else entry for entry in tables.levels)
    return dataclasses.replace(tables, levels=levels)


def _full_transform():
    """The fixture's transform with levels 6-8's steps (0.05, 0.2, 0.8) and its random probe, without the
    cross-layer record (these files predate level 9)."""
    import dataclasses

    from tests.unit.codec_fixtures import tiny_transform

    return dataclasses.replace(tiny_transform([small_kv(64, 1), small_kv(64, 2)], SMALL), cross_layer={})


def _cross_layer_transform():
    """The fixture's transform with level 7's steps (a transform record lists at least one level) and level 9's
    cross-layer record: a closed-loop design at step 0.1 on KV whose layers follow each other."""
    import dataclasses

    from tests.unit.codec_fixtures import tiny_transform

    full = tiny_transform([small_kv(64, 1), small_kv(64, 2)], SMALL)
    return dataclasses.replace(full, steps={7: full.steps[7]}, probe=None)


def _tiny_transform():
    """PCA of two KV samples in the plain metric, steps 0.05 (level 6) and 0.2 (level 7), rotary base 10000; the
    token-adaptive level 8 and its probe are left out, so these files stay what FORMAT.md Appendix A lists."""
    import dataclasses

    full = _full_transform()
    return dataclasses.replace(full, steps={level: full.steps[level] for level in (6, 7)}, probe=None)


def main() -> None:
    from cachegen.codec import decode, load_tables

    entries = build()
    tables = load_tables(entries["tables_small.cgct"][0])
    decoded = decode(entries["q32_small.bin"][0], SMALL, MODEL, tables=tables, backend="reference")
    entries["q32_small_decoded.bin"] = (decoded.view(torch.int16).numpy().tobytes(), "values")
    pca_tables = load_tables(entries["tables_small_pca.cgct"][0])
    decoded = decode(entries["pca2_small.bin"][0], SMALL, MODEL, tables=pca_tables, backend="reference")
    entries["pca2_small_decoded.bin"] = (decoded.view(torch.int16).numpy().tobytes(), "values")
    pca2t_tables = load_tables(entries["tables_small_pca2t.cgct"][0])
    decoded = decode(entries["pca2t_small.bin"][0], SMALL, MODEL, tables=pca2t_tables, backend="reference")
    entries["pca2t_small_decoded.bin"] = (decoded.view(torch.int16).numpy().tobytes(), "values")
    pca2x_tables = load_tables(entries["tables_small_pca2x.cgct"][0])
    decoded = decode(entries["pca2x_small.bin"][0], SMALL, MODEL, tables=pca2x_tables, backend="reference")
    entries["pca2x_small_decoded.bin"] = (decoded.view(torch.int16).numpy().tobytes(), "values")
    lines = []
    for name, (data, expect) in entries.items():
        (HERE / name).write_bytes(data)
        lines.append(f"{name} {hashlib.sha256(data).hexdigest()} {expect}")
    (HERE / "MANIFEST").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
