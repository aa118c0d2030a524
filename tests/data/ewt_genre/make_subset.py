"""Regenerate genre_subset.csv from UD English EWT (dev split); run from the repository root.

    python tests/data/ewt_genre/make_subset.py ../shared/data/ud-english-ewt/en_ewt-ud-dev.conllu

Per genre (the sentence id's prefix), documents are taken in file order, at most 6 sentences of 4 to 40
tokens each, until 60 sentences: 300 sentences, at least 10 documents per genre.
"""

import csv
import sys
from pathlib import Path

PER_GENRE, PER_DOC = 60, 6


def main(conllu: str) -> None:
    sents, sid, text, n_tok = [], None, None, 0
    for line in Path(conllu).read_text(encoding="utf-8").splitlines():
        if line.startswith("# sent_id = "):
            sid = line.split("= ", 1)[1].strip()
        elif line.startswith("# text = "):
            text = line.split("= ", 1)[1].strip()
        elif line and line[0].isdigit() and "\t" in line and "-" not in line.split("\t")[0]:
            n_tok += 1
        elif not line and sid:
            sents.append((sid, text, n_tok))
            sid, text, n_tok = None, None, 0
    taken, per_doc = {}, {}
    rows = []
    for sid, text, n in sents:
        genre, doc = sid.split("-")[0], sid.rsplit("-", 1)[0]
        if not 4 <= n <= 40 or taken.get(genre, 0) >= PER_GENRE or per_doc.get(doc, 0) >= PER_DOC:
            continue
        taken[genre] = taken.get(genre, 0) + 1
        per_doc[doc] = per_doc.get(doc, 0) + 1
        rows.append({"sent_id": sid, "genre": genre, "document": doc, "text": text})
    out = Path(__file__).with_name("genre_subset.csv")
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sent_id", "genre", "document", "text"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} sentences to {out}: {taken}")


if __name__ == "__main__":
    main(sys.argv[1])
