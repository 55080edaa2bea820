"""The worklist page under a reader's day, in Chromium against canned answers: a list of hundreds of studies that keeps
its headers, the open study and the reader's place in view across refreshes, a service that stops answering, and
what a keyboard or a screen reader user meets (the table's name, the token field, the badges' contrast)."""

from __future__ import annotations

import json

from tests.serve import test_worklist_page as canned
from tests.serve.test_worklist_page import ORIGIN, CannedService, entry

open_page = canned.open_page  # the page in Chromium, its requests answered by a CannedService

IN_VIEW = """(selector) => {  // whether the element's top edge is on the screen
  const box = document.querySelector(selector).getBoundingClientRect();
  return box.top >= 0 && box.top < innerHeight;
}"""


def long_list(count: int = 300) -> list[dict]:
    """`count` studies as the service lists them: URGENT, review, routine, then some not analysed."""
    rows = []
    for i in range(count):
        priority = "URGENT" if i < 40 else "review" if i < 100 else "routine" if i < count - 10 else None
        probability = None if priority is None else round(0.99 - i / (count + 1), 3)
        state = {"state": "not analysed", "reason": "out of scope: modality MR"} if priority is None else {}
        rows.append(entry(str(count - i), priority, probability, **state))
    return rows


def row_top(page, entry_id: str) -> float:
    return page.evaluate(f"() => document.querySelector('#worklist tbody tr[data-id=\"{entry_id}\"]').getBoundingClientRect().top")


def first_row_in_view(page) -> str:
    """The id of the first row whose top is below the column headers."""
    return page.evaluate("""() => {
      const below = document.querySelector('#worklist thead th').getBoundingClientRect().bottom;
      return [...document.querySelectorAll('#worklist tbody tr')].find((r) => r.getBoundingClientRect().top >= below - 1).dataset.id;
    }""")


def test_a_study_opened_far_down_a_long_list_shows_its_details_beside_it(open_page):
    """With 300 rows, the details of a study opened near the bottom were drawn at the top of the page, 8000 pixels
    above the row; the column headers had scrolled away, and the horizontal scrollbar that reaches the columns beyond
    the screen's width (received, source, model) sat below the last row."""
    rows = long_list()
    page = open_page(CannedService(rows))
    far = rows[250]["id"]
    page.click(f"#worklist tbody tr[data-id='{far}']")
    page.wait_for_function(f"() => document.getElementById('detail-title').textContent.includes('ACC{far}')")
    assert page.evaluate(IN_VIEW, "#detail") and page.evaluate(IN_VIEW, "#worklist thead th")
    assert page.evaluate("() => document.querySelector('main > section').getBoundingClientRect().bottom <= innerHeight")


def test_a_refresh_keeps_the_readers_place_in_a_long_list(open_page):
    """A refresh rebuilt the rows and focused the row opened last: a reader who had opened a study, then scrolled on,
    was taken back to it every 30 seconds; and a study arriving above moved every row under the reader's eyes."""
    rows = long_list()
    service = CannedService(rows)
    page = open_page(service)
    page.click(f"#worklist tbody tr[data-id='{rows[2]['id']}']")
    page.wait_for_selector("#detail:not([hidden])")
    page.hover(f"#worklist tbody tr[data-id='{rows[5]['id']}']")
    page.mouse.wheel(0, 4000)
    page.wait_for_function(
        f"() => document.querySelector('#worklist tbody tr[data-id=\"{rows[2]['id']}\"]').getBoundingClientRect().bottom < 0"
    )
    reading = first_row_in_view(page)
    top = row_top(page, reading)
    service.list([entry("9999", "URGENT", 0.999), *rows])  # a new URGENT study, listed above the others
    page.evaluate("loadWorklist()")
    assert first_row_in_view(page) == reading and abs(row_top(page, reading) - top) <= 1
    assert page.evaluate("() => document.activeElement.dataset.id") == rows[2]["id"]  # the keyboard stays where it was
    assert page.get_attribute(f"#worklist tbody tr[data-id='{rows[2]['id']}']", "aria-current") == "true"


def test_a_reader_at_the_top_of_the_list_sees_a_new_urgent_study(open_page):
    service = CannedService(long_list())
    page = open_page(service)
    service.list([entry("9999", "URGENT", 0.999), *long_list()])
    page.evaluate("loadWorklist()")
    assert first_row_in_view(page) == "9999"


def test_a_service_that_stops_answering_marks_the_list_out_of_date(open_page):
    """A service that accepts connections but never answers (hung, or a host gone behind a proxy) left the last list
    shown as current for as long as the page stayed open: each refresh waited on its request for ever."""
    service = CannedService([entry("1")])
    page = open_page(service)
    page.clock.install()
    page.wait_for_function("() => document.getElementById('updated').textContent.startsWith('List as of')")
    service.hold.add("/v1/worklist")
    page.evaluate("() => { loadWorklist(); }")
    page.clock.run_for(25_000)
    page.wait_for_function("() => document.getElementById('updated').textContent.includes('may be out of date')")
    assert "did not answer" in page.text_content("#status") and "stale" in page.get_attribute("#worklist", "class")
    service.hold.clear()
    page.evaluate("loadWorklist()")  # answered again: the list is current
    assert page.text_content("#status") == "" and "stale" not in page.get_attribute("#worklist", "class")


def accessible_name(page, role: str) -> list[str]:
    """The names Chromium's own accessibility tree gives the nodes of `role`."""
    session = page.context.new_cdp_session(page)
    nodes = session.send("Accessibility.getFullAXTree")["nodes"]
    return [n.get("name", {}).get("value", "") for n in nodes if n.get("role", {}).get("value") == role]


def test_the_table_is_named_for_a_screen_reader(open_page):
    """The caption that names the table and says how to open a row was `hidden`: out of the accessibility tree too."""
    page = open_page(CannedService([entry("1")]))
    (name,) = accessible_name(page, "table")
    assert "most urgent first" in name and "Enter" in name


def test_the_token_is_used_when_enter_is_pressed_in_its_field(open_page):
    """Typing the token and pressing Enter did nothing: only a click on 'Use token' (or Tab to it) applied it."""
    page = open_page(CannedService([entry("1")]))
    page.fill("#token", "secret-token")
    with page.expect_request(lambda r: r.url == f"{ORIGIN}/v1/worklist" and r.headers.get("authorization") == "Bearer secret-token"):
        page.press("#token", "Enter")


CONTRAST = """(selector) => {  // WCAG contrast ratio of the element's text colour against its background colour
  const style = getComputedStyle(document.querySelector(selector));
  const luminance = (css) => {
    const [r, g, b] = css.match(/\\d+(\\.\\d+)?/g).slice(0, 3).map((v) => +v / 255)
      .map((c) => (c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4));
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const [a, b] = [luminance(style.color), luminance(style.backgroundColor)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05);
}"""


def test_every_priority_badge_is_legible(open_page):
    """Badge text is 12 px: WCAG AA asks 4.5:1. White on the review amber was 4.2:1, on the grey of a study without a
    score 3.2:1."""
    rows = [entry("1", "URGENT", 0.9), entry("2", "review", 0.5), entry("3", "routine", 0.1), entry("4", None, None)]
    page = open_page(CannedService(rows))
    ratios = {row["id"]: page.evaluate(CONTRAST, f"#worklist tbody tr[data-id='{row['id']}'] .badge") for row in rows}
    assert all(ratio >= 4.5 for ratio in ratios.values()), json.dumps(ratios)


def test_a_tab_brought_back_into_view_refreshes_its_list_at_once(open_page):
    """A hidden tab is not refreshed; brought back, it showed the list of when it was hidden until the next 30-second
    tick."""
    service = CannedService([entry("1", "routine", 0.1)])
    page = open_page(service)
    service.list([entry("2", "URGENT", 0.97), entry("1", "routine", 0.1)])  # arrived while the tab was hidden
    page.evaluate("""() => {
      Object.defineProperty(document, 'hidden', { value: false, configurable: true });
      document.dispatchEvent(new Event('visibilitychange'));
    }""")
    page.wait_for_function("() => document.querySelector('#worklist tbody tr[data-id=\"2\"]')", timeout=10_000)
