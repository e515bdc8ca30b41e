"""The HTML page, rendered from the report's JSON summary alone (no other input).

One self-contained file: inline CSS, no script, no web fonts, images beside it, so the
folder opens offline and prints. A summary on top says, in one line each, what a person
deciding whether to train on the build needs; the sections below hold the evidence.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1120px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
nav a{margin-right:1em}code{background:#f3f3f3;padding:0 .25em;border-radius:3px}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:3px 10px;border-bottom:1px solid #e5e5e5;
text-align:left;vertical-align:top}th{background:#f6f6f6}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#c0392b;font-weight:600}.warn{color:#9a6700}.muted{color:#777}
.summary td:first-child{font-weight:600;white-space:nowrap}
img.fig{max-width:100%;display:block;margin:.4em 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
.pair{border:1px solid #ddd;border-radius:6px;padding:8px}.pair img{width:250px;height:250px;image-rendering:pixelated}
.pair ol{margin:.3em 0 0 1.2em;padding:0;font-size:.85em}.pair .key{font-size:.8em;color:#555;word-break:break-all}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em;margin:.6em 0}
details{margin:.2em 0 1em}summary{cursor:pointer;color:#345}
.caps td img{width:128px;height:128px;image-rendering:pixelated}.caps td:last-child{word-break:break-word}
"""

esc = html.escape


def _num(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return esc(v)
    if isinstance(v, int):
        return f"{v:,}"
    if math.isinf(v):
        return "∞"
    if math.isnan(v):
        return "nan"
    return f"{v:,.{digits}f}"


def _p(v: Any) -> str:
    return "–" if v is None else (f"{v:.3g}" if isinstance(v, (int, float)) else esc(str(v)))


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return str(n)


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped unless they are already markup (tuple ("html", s))."""
    def cell(v: Any, i: int, tag: str) -> str:
        cls = ' class="n"' if i in numeric else ""
        if isinstance(v, tuple) and v and v[0] == "html":
            return f"<{tag}{cls}>{v[1]}</{tag}>"
        return f"<{tag}{cls}>{esc(str(v))}</{tag}>"

    h = "".join(cell(c, i, "th") for i, c in enumerate(head))
    body = "".join("<tr>" + "".join(cell(c, i, "td") for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def img(src: str, alt: str) -> str:
    return f'<img class="fig" src="{esc(src)}" alt="{esc(alt)}">'


def _cls(ok: bool | None) -> str:
    return "muted" if ok is None else ("ok" if ok else "bad")


# ------------------------------------------------------------------ summary ---


def _summary(s: dict[str, Any]) -> str:
    p = s["pairs"]
    items: list[tuple[str, str, bool | None]] = []
    shards = s["stages"]["pairs"]
    incomplete = shards["incomplete"]
    items.append(("Rows", f"{p['rows']:,} pairs in {shards['shards']} complete shards from {len(p['sources'])} "
                  f"source(s), {_bytes(shards['bytes'])}"
                  + (f"; {len(incomplete)} unfinished shard(s) left out" if incomplete else ""), not incomplete))
    f = p["failed"]
    frac = f["total"] / p["planned"] if p["planned"] else 0.0
    top = next(iter(f["by_reason"]), None)
    items.append(("Failed rows", f"{f['total']:,} of {p['planned']:,} planned ({100 * frac:.2f}%)"
                  + (f"; most: {top} ({f['by_reason'][top]:,})" if top else ""), f["total"] == 0))
    fit = p["fit"]
    if fit["flagged"]:
        text = (f"{len(fit['flagged'])} of {fit['tested']} tested draws do NOT follow the degrade settings: "
                + ", ".join(fit["flagged"]))
    else:
        text = f"all {fit['tested']} tested draws follow the degrade settings"
    text += (f" (χ² / KS, family-wise α {fit['alpha']:g}: flag at p < {fit['threshold']:.2g}; "
             f"settings from {s['settings']['source']})")
    items.append(("Fit of the draws", text, not fit["flagged"]))
    q = p["psnr"]
    if q["measured"] and q["lq"]["moments"]["n"]:
        m, r, rt = q["lq"]["moments"], q["reference"], q["roundtrip"]["moments"]
        items.append(("LQ quality", f"{m['mean']:.2f} dB mean (std {_num(m['std'])}) PSNR of the bicubic-upsampled LQ; "
                      f"BasicSR 1.4.2 reference {r['mean']} dB (std {r['std']}); plain bicubic round trip "
                      f"{_num(rt['mean'])} dB", None))
    c = s.get("captions")
    if c:
        st = c["status"]
        items.append(("Captions", f"{c['rows']:,} rows: " + ", ".join(f"{k} {v:,}" for k, v in st.items()),
                      st.get("failed", 0) == 0))
    else:
        items.append(("Captions", "no captions stage in this build", None))
    e = s.get("text_emb")
    items.append(("Text embeddings", f"{e['rows']:,} rows, {_num(e['mean_chunks'])} chunks per row, "
                  f"{_bytes(e['bytes_per_row'])} per row, {e['truncated_rows']:,} truncated" if e
                  else "no text_emb stage in this build", None))
    lat = s.get("latents")
    items.append(("Latents", f"{lat['rows']:,} rows, {_bytes(lat['bytes_per_row'])} per row" if lat
                  else "no latents stage in this build", None))
    t = s.get("training")
    if t:
        loss = t["losses"].get("loss") or next(iter(t["losses"].values()), {})
        items.append(("Training", f"{t['steps']:,} steps; loss {_num(loss.get('smoothed'), 4)} (smoothed), "
                      f"{_num(t['samples_per_s'])} samples/s, data wait {100 * t['data_wait']:.1f}%", None))
    else:
        items.append(("Training", "no training run (no train/metrics.jsonl)", None))
    ev = s.get("evaluation")
    if ev and ev["datasets"]:
        d = ev["datasets"][0]
        row = d["rows"][0] if d["rows"] else {}
        scores = ", ".join(f"{k} {_num(v, 3)}" for k, v in (row.get("scores") or {}).items())
        note = ev["restore"].get("note") or ""
        items.append(("Evaluation", f"{d['name']}, {row.get('method', '?')}: {scores}. {note}", None))
    elif ev:
        items.append(("Evaluation", "held-out folder given but no results: " + "; ".join(ev["problems"]), False))
    if s["key_mismatches"]:
        items.append(("Keys", "stages disagree on keys in " + ", ".join(s["key_mismatches"]), False))
    rows = "".join(f'<tr><td>{esc(k)}</td><td class="{_cls(ok)}">{esc(v)}</td></tr>' for k, v, ok in items)
    return f'<table class="summary"><tbody>{rows}</tbody></table>'


# ------------------------------------------------------------------ sections ---


def _gallery(p: dict[str, Any]) -> str:
    out = []
    for g in p["gallery"]:
        imgs = "".join(f'<img src="{esc(g[k])}" alt="{k.upper()} {esc(g["key"])}" title="{k.upper()}">'
                       for k in ("lq", "hq") if g.get(k))
        steps = "".join(f"<li>{esc(w)}</li>" for w in g["words"])
        psnr = f" · LQ PSNR {g['lq_psnr']:.2f} dB" if isinstance(g.get("lq_psnr"), (int, float)) else ""
        out.append(f'<div class="pair">{imgs}<div class="key">{esc(g["key"])} (shard {g["shard"]}){psnr}</div>'
                   f"<ol>{steps}</ol></div>")
    return ('<p>LQ (left, 128², shown enlarged without smoothing) | HQ (right, as stored). Rows chosen by the '
            "smallest sha256 of their key: a fixed, uniform sample of the build. Each recipe, step by step:</p>"
            f'<div class="gallery">{"".join(out)}</div>')


def _param_block(p: dict[str, Any]) -> str:
    fit = p["fit"]
    verdict = ('<span class="bad">does not fit</span>' if p["flagged"]
               else ('<span class="ok">fits</span>' if fit["p_value"] is not None else '<span class="muted">not tested</span>'))
    test = {"chi2": "χ²", "ks": "KS"}.get(fit["test"], fit["test"])
    if p["kind"] == "categorical":
        rows = [(c, n, f"{e:.1f}") for c, n, e in zip(p["categories"], p["counts"], p["expected"])]
        head = ("value", "drawn", "expected")
    else:
        h = p["histogram"]
        rows = [(f"[{a:.4g}, {b:.4g}{']' if i == len(h['counts']) - 1 else ')'}", n, f"{e:.1f}")
                for i, (a, b, n, e) in enumerate(zip(h["edges"][:-1], h["edges"][1:], h["counts"], p["expected"]))]
        if h["below"] or h["above"]:
            rows.append(("outside the range", h["below"] + h["above"], "0.0"))
        head = ("bin", "drawn", "expected")
    return (f'<h4 id="draw-{esc(p["name"])}">{esc(p["label"])} <code>{esc(p["name"])}</code></h4>'
            f"<p>Settings: {esc(p['settings'])}. {p['n']:,} draws; {test} statistic {_p(fit['statistic'])}, "
            f"p = {_p(fit['p_value'])}: {verdict}. <span class='muted'>{esc(fit['note'])}</span></p>"
            + img(p["figure"], f"{p['name']} draws against the settings")
            + f"<details><summary>counts</summary>{table(head, rows, numeric=(1, 2))}</details>")


def _pairs(s: dict[str, Any]) -> str:
    p = s["pairs"]
    fit = p["fit"]
    parts = ["<h2 id='pairs'>Pairs</h2>", "<h3>Gallery</h3>", _gallery(p)]
    parts.append("<h3>Degradation draws against the settings</h3>")
    parts.append(f"<p>Every draw of every recipe, counted, beside the distribution the degrade settings define "
                 f"(computed from the settings, not by the sampler: taken from {esc(s['settings']['source'])}"
                 + (f"; the pairs shards were built with {s['settings']['variants']} different settings, the most "
                    "common is used" if s['settings']['variants'] > 1 else "")
                 + "). Choices are tested with Pearson's χ² (categories pooled to ≥ 5 expected), continuous "
                 "draws with Kolmogorov–Smirnov; conditional draws on the rows where they happen. A draw is "
                 f"flagged when p < {fit['threshold']:.2g} ({fit['method']}, α {fit['alpha']:g}).</p>")
    parts.append(img("figures/fit_overview.png", "p-values of every draw"))
    parts += [_param_block(x) for x in p["params"]]
    parts.append("<h3>LQ quality</h3>")
    q = p["psnr"]
    if q["measured"] and q["lq"]["moments"]["n"]:
        r = q["reference"]
        parts.append(img("figures/lq_psnr.png", "LQ PSNR histogram"))
        parts.append(f"<p>PSNR of each LQ, bicubic-upsampled to the HQ size, against its stored HQ (RGB, all "
                     f"pixels, peak 255), beside the same HQ merely bicubic-downscaled ×4 and back (no "
                     f"degradation: the ceiling). <b>Reference</b> (mean {r['mean']} dB, std {r['std']}, n {r['n']}): "
                     f"{esc(r['source'])}.</p>")
        if q["identical"]:
            parts.append(f"<p class='warn'>{q['identical']} pairs whose upsampled LQ equals the HQ (left out).</p>")
    else:
        parts.append("<p class='muted'>Not measured (--no-psnr).</p>")
    f = p["failed"]
    parts.append("<h3>Failed rows</h3>")
    if f["total"]:
        parts.append(img("figures/failed.png", "failed rows by reason"))
        parts.append(table(("reason", "rows", "examples"),
                           [(r, n, "; ".join(f["examples"].get(r, []))) for r, n in f["by_reason"].items()], numeric=(1,)))
        parts.append(table(("source", "failed rows"), list(f["by_source"].items()), numeric=(1,)))
    else:
        parts.append("<p class='ok'>None: every planned row is in the shards.</p>")
    if p["unreadable"]:
        parts.append(table(("unreadable in the shards", "rows"), list(p["unreadable"].items()), numeric=(1,)))
    parts.append("<h3>Rows per source</h3>" + img("figures/sources.png", "rows per source")
                 + table(("source", "rows"), list(p["sources"].items()), numeric=(1,)))
    return "".join(parts)


def _captions(s: dict[str, Any]) -> str:
    c = s.get("captions")
    if not c:
        return ("<h2 id='captions'>Captions</h2><p class='muted'>This build has no captions stage "
                "(<code>python jobs/caption.py --manifest M --all</code> makes one).</p>")
    parts = ["<h2 id='captions'>Captions</h2>",
             f"<p>{c['rows']:,} rows by <code>{esc(str(c['model']))}</code>, max_tokens {_num(c['max_tokens'])}. "
             "Status: <i>ok</i>, <i>failed</i> (embedded as the empty prompt), <i>override</i> (written by a person), "
             "<i>length-cut</i> (ok, but stopped by the token cap; counted where the shard records finish reasons).</p>",
             table(("status", "rows"), list(c["status"].items()), numeric=(1,)),
             table(("finish reason", "rows"), list(c["finish_reasons"].items()), numeric=(1,))
             if c["finish_reasons"] else "<p class='muted'>The captions shards record no finish reasons.</p>",
             img("figures/caption_status.png", "caption status")]
    if c["clip_tokens"]:
        parts.append(img("figures/caption_tokens.png", "CLIP tokens per caption"))
        parts.append(table(("75-token chunks needed", "rows"), list(c["chunks_needed"].items()), numeric=(1,)))
        parts.append(f"<p>{c['truncated_rows']:,} rows longer than the embed stage's max_chunks (truncated).</p>")
    else:
        parts.append("<p class='muted'>CLIP token counts come from the text_emb stage, which this build lacks; "
                     "words per caption below.</p>")
    parts.append(img("figures/caption_words.png", "words per caption"))
    if c["top_words"]:
        parts.append(img("figures/caption_top_words.png", "most frequent words"))
        if c["words_pruned"]:
            parts.append("<p class='muted'>Counts past 50,000 distinct words are approximate.</p>")
    if c["failed"]["total"]:
        parts.append(table(("failure", "rows"), list(c["failed"]["by_reason"].items()), numeric=(1,)))
    rows = [(("html", f'<img src="{esc(g["lq"])}" alt="LQ">') if g.get("lq") else "", g["key"],
             g.get("caption_status") or "", g.get("caption") or "")
            for g in s["pairs"]["gallery"] if g.get("caption") is not None]
    if rows:
        parts.append("<h3>Captions beside their LQ</h3><div class='caps'>"
                     + table(("LQ", "key", "status", "caption"), rows) + "</div>")
    return "".join(parts)


def _embeddings(s: dict[str, Any]) -> str:
    parts = ["<h2 id='embeddings'>Embeddings and latents</h2>"]
    e = s.get("text_emb")
    if e:
        parts.append(table(("text_emb", ""), [
            ("rows", f"{e['rows']:,} in {e['shards']} shards"), ("encoder", e["model"] or "?"),
            ("hidden size", _num(e["hidden_size"])), ("chunks per row (mean)", _num(e["mean_chunks"])),
            ("max chunks", _num(e["max_chunks"])), ("bytes per row", _bytes(e["bytes_per_row"])),
            ("total", _bytes(e["bytes"])), ("truncated rows / tokens", f"{e['truncated_rows']:,} / {e['truncated_tokens']:,}"),
            ("padding (EOS) share of stored positions", _num(e["padding_waste"], 3))]))
        parts.append(table(("chunks stored", "rows"), list(e["chunks"].items()), numeric=(1,)))
    else:
        parts.append("<p class='muted'>No text_emb stage (<code>python jobs/embed.py --manifest M --all</code>).</p>")
    lat = s.get("latents")
    if lat:
        parts.append(table(("latents", ""), [("rows", f"{lat['rows']:,} in {lat['shards']} shards"),
                                              ("bytes per row", _bytes(lat["bytes_per_row"])), ("total", _bytes(lat["bytes"]))]
                           + [(k, str(v)) for k, v in lat["details"].items()]))
    else:
        parts.append("<p class='muted'>No latents stage.</p>")
    return "".join(parts)


def _training(s: dict[str, Any]) -> str:
    t = s.get("training")
    if not t:
        return ("<h2 id='training'>Training</h2><p class='muted'>No training run in this build "
                "(<code>python model/train.py --manifest M</code> writes <code>train/metrics.jsonl</code>).</p>")
    rows = [(k, _num(v["last"], 5), _num(v["smoothed"], 5)) for k, v in t["losses"].items()]
    parts = ["<h2 id='training'>Training</h2>",
             f"<p>{t['steps']:,} steps ({t['logged_steps']:,} logged) from <code>{esc(t['dir'])}</code>; base model "
             f"<code>{esc(str(t['pretrained']))}</code>; last learning rate {_num(t['lr'], 8)}; "
             f"{_num(t['samples_per_s'])} samples/s, data wait {100 * t['data_wait']:.2f}% of a step (medians).</p>",
             table(("loss term", "last", "smoothed"), rows, numeric=(1, 2)),
             img(t["figure"], "training curves")]
    if t["validation"]:
        parts.append(f"<h3>Latest validation grid (step {t['validation_step']:,}): LQ | restored | HQ</h3>"
                     + img(t["validation"], "validation grid"))
    return "".join(parts)


def _evaluation(s: dict[str, Any]) -> str:
    ev = s.get("evaluation")
    if ev is None:
        return ("<h2 id='evaluation'>Evaluation</h2><p class='muted'>No held-out results given "
                "(<code>--heldout DIR</code>).</p>")
    parts = ["<h2 id='evaluation'>Evaluation</h2>",
             "<p class='note'><b>Scores mean something only for a model trained from real weights.</b> "
             "Random weights restore nothing: with <code>make demo</code>'s tiny random models the restored "
             "column is noise and the metrics measure that noise. "
             + esc(ev["restore"].get("note") or "") + "</p>"]
    labels = ev["metrics"]
    for d in ev["datasets"]:
        cols: list[str] = []
        for r in d["rows"]:
            cols += [k for k in list(r.get("scores", {})) + list(r.get("not_computed", {})) if k not in cols]
        head = ["method", "images"] + [
            f"{(labels.get(k) or {}).get('label', k)} {'↑' if (labels.get(k) or {}).get('higher_better', True) else '↓'}"
            for k in cols]
        rows = [[r.get("method", "?"), r.get("images", "?")]
                + [_num(r["scores"][k], 4) if k in r.get("scores", {}) else "–" for k in cols] for r in d["rows"]]
        parts.append(f"<h3>{esc(d['name'])}</h3>" + table(head, rows, numeric=tuple(range(1, len(head)))))
        notes = [f"{r.get('method')}, {k}: {str(v).splitlines()[0]}" for r in d["rows"]
                 for k, v in (r.get("not_computed") or {}).items()]
        if notes:
            parts.append("<p class='muted'>Not computed (–): " + esc("; ".join(notes)) + "</p>")
    if ev["grid"]:
        parts.append("<h3>Held-out images: LQ (bicubic ×4) | restored | HQ</h3>"
                     + f"<p>Rows, top to bottom: {esc(', '.join(ev['grid_images']))}.</p>" + img(ev["grid"], "held-out grid"))
    if any(ev["prompts"].values()):
        parts.append("<h3>Captions the held-out images were restored with</h3>"
                     + table(("image", "prompt"), list(ev["prompts"].items())))
    if ev["problems"]:
        parts.append("<p class='warn'>" + esc("; ".join(ev["problems"])) + "</p>")
    return "".join(parts)


def _rate(r: dict[str, Any]) -> str:
    """A rate, and for slow stages the time per item too (0.03 images/s reads badly)."""
    rate = r.get("rate")
    if not isinstance(rate, (int, float)) or rate <= 0:
        return "–"
    text = f"{_num(rate)} {r['rate_unit']}"
    per = r.get("per") or r["unit"].rstrip("s")
    return text + (f" ({1 / rate:,.1f} s per {per})" if rate < 1 else "")


def _throughput(s: dict[str, Any]) -> str:
    rows = [(r["stage"], _num(r["rows"]) if r.get("rows") is not None else "–",
             _num(r["seconds"], 1 if r["seconds"] >= 1 else 3) if r.get("seconds") is not None else "–",
             _rate(r), r["detail"])
            for r in s["throughput"]]
    return ("<h2 id='throughput'>Throughput</h2><p>Work time from each stage's own timing (sidecars, metrics.jsonl, "
            "restore.json): a rate per worker, to be multiplied by the workers a stage ran on.</p>"
            + table(("stage", "rows", "work s", "rate", "detail"), rows, numeric=(1, 2)))


def render_page(s: dict[str, Any]) -> str:
    title = f"Data card: {s['build']}"
    missing = ", ".join(s["missing_stages"]) or "none"
    incomplete = [f"{k}: {'; '.join(v['incomplete'])}" for k, v in s["stages"].items() if v["incomplete"]]
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (("pairs", "Pairs"), ("captions", "Captions"),
                                                          ("embeddings", "Embeddings"), ("training", "Training"),
                                                          ("evaluation", "Evaluation"), ("throughput", "Throughput")))
    body = [f"<h1>{esc(title)}</h1>",
            f"<p class='muted'>Generated {esc(s['generated'])} by <code>python jobs/report.py --build {esc(s['build'])}</code>. "
            f"Stages present: {esc(', '.join(s['stages']))}; missing: {esc(missing)}.</p>",
            f"<nav>{nav}</nav>", "<h2 id='summary'>Summary</h2>", _summary(s)]
    if incomplete:
        body.append("<p class='warn'>Unfinished shards (not counted): " + esc(" | ".join(incomplete)) + "</p>")
    body += [_pairs(s), _captions(s), _embeddings(s), _training(s), _evaluation(s), _throughput(s),
             "<p class='muted'>Every number on this page is also in <a href='stats.json'>stats.json</a>.</p>"]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
