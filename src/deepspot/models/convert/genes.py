"""Gene lists for a converted model: a list, or a file (the original's gene table, JSON, CSV/TSV or text)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from deepspot.models.convert.unpickle import ConvertError


_GENE_COLUMNS = ("gene_name", "gene_names", "gene", "genes", "gene_ids", "symbol")
_TRUE, _FALSE = {"true", "1", "t", "yes", "1.0"}, {"false", "0", "f", "no", "0.0", ""}


def _gene_table(p: Path, rows: list[list[str]]) -> list[str]:
    """The original's gene table (e.g. info_highly_variable_genes.csv): gene_name where isPredicted, file order."""
    header = [h.strip() for h in rows[0]]
    gi, pi = header.index("gene_name"), header.index("isPredicted")
    genes = []
    for n, r in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in r):
            continue
        if len(r) <= max(gi, pi):
            raise ConvertError(f"{p}: line {n} has {len(r)} columns, the header {len(header)}")
        flag = r[pi].strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ConvertError(f"{p}: line {n}: isPredicted is {r[pi]!r}, not True/False")
        if flag in _TRUE:
            genes.append(r[gi].strip())
    return genes


def read_gene_list(genes) -> list[str]:
    """A gene list from a list, or a file, detected from its content: the original's gene table (a CSV with
    ``gene_name`` and ``isPredicted`` columns: the predicted genes in file order), a JSON list, a CSV/TSV (the
    gene column, else the first), or text with one gene per line."""
    if genes is None:
        return []
    if not isinstance(genes, (str, Path)):
        return [str(g) for g in genes]
    p = Path(genes)
    if not p.is_file():
        raise ConvertError(f"{p}: gene list file not found")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ConvertError(f"{p}: not a text gene list") from None
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if p.suffix == ".json" or first.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{p}: invalid JSON gene list ({e.msg})") from None
        if isinstance(data, dict):
            data = data.get("genes", data.get("gene_names"))
        if not isinstance(data, list):
            raise ConvertError(f"{p}: expected a JSON list of genes")
        return [str(g) for g in data]
    delim = "\t" if "\t" in first else "," if "," in first else None
    if delim is None:
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delim)]
    header = [h.strip() for h in rows[0]]
    if "gene_name" in header and "isPredicted" in header:
        return _gene_table(p, rows)
    lower = [h.lower() for h in header]
    col = next((lower.index(c) for c in _GENE_COLUMNS if c in lower), None)
    body = rows[1:] if col is not None else rows
    col = 0 if col is None else col
    return [r[col].strip() for r in body if len(r) > col and r[col].strip()]

