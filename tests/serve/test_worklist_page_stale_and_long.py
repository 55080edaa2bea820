"""The worklist page in Chromium against canned answers: the open study's details marked out of date with the list,
and header values too long for their column cut short in the row, whole in its tooltip and the details."""

from __future__ import annotations

import pytest

from tests.serve.test_worklist_page import CannedService, entry, open_page  # noqa: F401 (fixture)
from tests.serve.test_worklist_review_page import accessible_name

OPACITY = """(selector) => {  // the opacity the element is drawn with: its own times its ancestors'
  let opacity = 1;
  for (let node = document.querySelector(selector); node; node = node.parentElement) opacity *= +getComputedStyle(node).opacity;
  return opacity;
}"""

STALE_NOTE = "details may be out of date"


def said_to_a_screen_reader(page, words: str) -> bool:
    return any(words in name for name in accessible_name(page, "StaticText"))


def fail_list(service: CannedService, how: str) -> None:
    if how == "down":
        service.down = True
    else:
        service.answers["/v1/worklist"] = (503, {"error": {"reason": "the service is busy"}})


@pytest.mark.parametrize("how", ["busy", "down"])
def test_the_open_studys_details_are_marked_out_of_date_with_the_list(open_page, how):  # noqa: F811
    """A failed refresh dimmed the rows but not the open study's details: a reader could take them for current."""
    service = CannedService([entry("1", "URGENT", 0.9), entry("2")])
    page = open_page(service)
    page.click("#worklist tbody tr[data-id='1']")
    page.wait_for_function("() => document.getElementById('detail-title').textContent.includes('ACC1')")
    assert page.evaluate(OPACITY, "#detail-fields") == 1 and not said_to_a_screen_reader(page, STALE_NOTE)

    fail_list(service, how)
    page.evaluate("loadWorklist()")
    assert "stale" in page.get_attribute("#worklist", "class")
    assert page.evaluate(OPACITY, "#detail-fields") < 1 and page.evaluate(OPACITY, "#detail-title") < 1
    assert said_to_a_screen_reader(page, STALE_NOTE)

    if how == "busy":  # the list fails, a study's details still come: those just fetched are current
        page.click("#worklist tbody tr[data-id='2']")
        page.wait_for_function("() => document.getElementById('detail-title').textContent.includes('ACC2')")
        assert page.evaluate(OPACITY, "#detail-fields") == 1 and not said_to_a_screen_reader(page, STALE_NOTE)
        assert "stale" in page.get_attribute("#worklist", "class")

    service.down = False
    service.list([entry("1", "URGENT", 0.9), entry("2")])
    page.evaluate("loadWorklist()")
    assert "stale" not in page.get_attribute("#worklist", "class")
    assert page.evaluate(OPACITY, "#detail-fields") == 1 and not said_to_a_screen_reader(page, STALE_NOTE)


LONG = {
    "patient_id": "P" + "1234567890" * 6 + "123",  # 64 characters, a header's longest patient ID
    "accession": "<b>ACC</b>" + "9" * 30,  # markup in a header value stays text
    "study_date": "2026-03-01" + "x" * 40,
    "modality": "CR" + "M" * 40,
    "source": "WARD_" + "W" * 60,
    "model": "tiny-" + "m" * 60,
}
LONG_DESCRIPTION = "CHEST" + "Z" * 59
COLUMNS = {
    "Patient": "patient_id",
    "Accession": "accession",
    "Study date": "study_date",
    "Modality": "modality",
    "Source": "source",
    "Model": "model",
}

COLUMN_WIDTHS = """() => [...document.querySelectorAll('#worklist thead th')].map((th) => th.getBoundingClientRect().width)"""

CELLS = """(id) => [...document.querySelector(`#worklist tbody tr[data-id="${id}"]`).cells].map((td) => {
  const clip = td.querySelector('.clip') || td;  // the value's own box, where a mark follows it in the cell
  const style = getComputedStyle(clip);
  return { text: clip.textContent, title: clip.title, cut: clip.scrollWidth > clip.clientWidth,
           ellipsis: style.textOverflow === 'ellipsis' };
})"""


def test_a_long_header_value_does_not_widen_its_column(open_page):  # noqa: F811
    """One 64-character patient ID widened the Patient column for every row, pushing the others off the screen."""
    short = [entry("1", "URGENT", 0.9), entry("2")]
    service = CannedService(short)
    page = open_page(service)
    before = page.evaluate(COLUMN_WIDTHS)

    long = entry("3", "review", 0.5, source_drifting=True, study_description=LONG_DESCRIPTION, **LONG)
    service.list([*short, long])
    page.evaluate("loadWorklist()")
    page.wait_for_selector("#worklist tbody tr[data-id='3']")
    after = page.evaluate(COLUMN_WIDTHS)
    headers = page.eval_on_selector_all("#worklist thead th", "ths => ths.map((th) => th.textContent)")
    grown = {name: round(a - b) for name, a, b in zip(headers, after, before) if a > max(b, 280)}  # 20 em at the page's 14 px
    assert not grown, f"columns widened by one long value (px): {grown}; now {dict(zip(headers, map(round, after)))}"

    cells = dict(zip(headers, page.evaluate(CELLS, "3")))
    for name, key in COLUMNS.items():
        shown = cells[name]
        assert shown["cut"] and shown["ellipsis"], f"{name}: {shown}"
        assert LONG[key] in shown["text"] and LONG[key] in shown["title"], f"{name}: the whole value is kept"
    assert page.eval_on_selector_all("#worklist tbody b", "bold => bold.length") == 0

    flag = page.evaluate("""() => {  // the drift mark after a cut source name stays in view
      const td = document.querySelector('#worklist tbody tr[data-id="3"]').cells[9];
      const mark = td.querySelector('.flag').getBoundingClientRect(), box = td.getBoundingClientRect();
      return mark.width > 0 && mark.left >= box.left && mark.right <= box.right + 0.5;
    }""")
    assert flag

    page.click("#worklist tbody tr[data-id='3']")
    page.wait_for_function("() => document.getElementById('detail-title').textContent.includes('ACC</b>')")
    shown = page.text_content("#detail-fields")
    assert LONG["patient_id"] in shown and LONG_DESCRIPTION in shown  # whole in the details
    assert page.evaluate("() => document.getElementById('detail').getBoundingClientRect().width") <= 360


def test_the_list_still_scrolls_sideways_to_its_last_column(open_page):  # noqa: F811
    """Cut values must not take away the list's own horizontal scrolling on a narrow screen, nor make the page scroll."""
    page = open_page(CannedService([entry("1", "URGENT", 0.9, **LONG), entry("2")]))
    page.set_viewport_size({"width": 900, "height": 700})
    page.wait_for_function("() => { const l = document.getElementById('list'); return l.scrollWidth > l.clientWidth; }")
    assert page.evaluate("() => document.documentElement.scrollWidth <= innerWidth")
    reached = page.evaluate("""() => {
      const list = document.getElementById('list');
      list.scrollLeft = list.scrollWidth;
      const last = document.querySelector('#worklist thead th:last-child').getBoundingClientRect();
      return last.right <= list.getBoundingClientRect().right + 1 && last.left >= list.getBoundingClientRect().left;
    }""")
    assert reached
