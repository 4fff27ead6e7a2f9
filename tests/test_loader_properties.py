"""Property-based tests of the dataset loaders: on any input they either load correctly or raise the one
bad-input error (FromageInputError naming the file), never anything else."""
import json
import random

import pandas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.datasets import load_stories, read_cc3m_rows
from model.errors import FromageInputError
from tasks.visdial import load_dialogues

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                                              children, max_size=4),
                           max_leaves=20)


@SETTINGS
@given(text=st.text(max_size=200))
def test_tsv_reader_never_crashes_on_arbitrary_text(tmp_path, text):
    path = tmp_path / "x.tsv"
    path.write_text(text, encoding="utf-8")
    try:
        rows = read_cc3m_rows(path)
    except FromageInputError as err:
        assert str(path) in str(err)
    else:
        assert all(len(r) == 3 for r in rows)


@SETTINGS
@given(rows=st.lists(st.tuples(st.text(alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)),
                                      min_size=1, max_size=20),
                               st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True)), min_size=1, max_size=6))
def test_tsv_reader_reads_back_pandas_written_files(tmp_path, rows):
    """Captions with quotes and tabs, as pandas (the tool the original's TSVs are read with) writes them."""
    path = tmp_path / "ok.tsv"
    pandas.DataFrame(rows, columns=["caption", "image"]).to_csv(path, sep="\t", index=False)
    try:
        read = read_cc3m_rows(path)
    except FromageInputError as err:  # e.g. a caption that is only spaces is refused as empty
        assert any(not c.strip() for c, _ in rows), err
        return
    assert [(caption, image) for _, caption, image in read] == rows


@SETTINGS
@given(value=json_values)
def test_vist_and_visdial_loaders_refuse_junk_cleanly(tmp_path, value):
    for loader in (load_stories, load_dialogues):
        path = tmp_path / "junk.json"
        path.write_text(json.dumps(value))
        try:
            loader(path)
        except FromageInputError as err:
            assert str(path) in str(err)


@SETTINGS
@given(seed=st.integers(0, 10_000), n_stories=st.integers(1, 4))
def test_vist_stories_sorted_by_worker_order_whatever_the_file_order(tmp_path, seed, n_stories):
    rng = random.Random(seed)
    annotations = []
    for s in range(n_stories):
        for order in range(5):
            annotations.append([{"story_id": str(s), "storylet_id": f"{s}{order}", "album_id": "a",
                                 "photo_flickr_id": f"p{s}_{order}", "worker_arranged_photo_order": order,
                                 "text": f"sentence {order}", "original_text": f"sentence {order}"}])
    rng.shuffle(annotations)
    path = tmp_path / "sis.json"
    path.write_text(json.dumps({"images": [], "albums": [], "annotations": annotations}))
    stories, _ = load_stories(path)
    assert len(stories) == n_stories
    for story in stories:
        text = json.dumps(story.__dict__ if hasattr(story, "__dict__") else list(story), default=str)
        positions = [text.find(f"sentence {o}") for o in range(5)]
        assert positions == sorted(positions)
