

def write_synth_corpus(out, n: int, seed: int, files: int):
    """The demo generator's pages (exact and near duplicates planted) as `files` JSON-lines files
    in `out`, document i in file i % files; returns `out`."""
    import json

    from smelt.data.synth import generate

    docs = list(generate(n, seed=seed))
    for f in range(files):
        with open(out / f"part-{f}.jsonl", "w", encoding="utf-8") as fh:
            for d in docs[f::files]:
                fh.write(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n")
    return out
