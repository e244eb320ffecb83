"""The built-in dashboard in a real browser: Debian's headless Chromium driven by Playwright (its own browser
download cannot work here, so `executable_path` points at /usr/bin/chromium; a missing browser fails the test).

Against a real `hwprune serve` (embedded worker, SQLite): enter a key, upload a model, submit a SMART job from
the form, watch the row reach `succeeded` without reloading (SSE over fetch), open the job page, check every
chart was drawn with data, download model.onnx through the authenticated blob link and load it in ONNX
Runtime; then a 3D job (samples + chosen point chart), and both jobs on the comparison view.
Screenshots go to the test's tmp folder."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from playwright.sync_api import Page

from tests.service.conftest import Proc, free_port, service_env, wait_http

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Records every status / progress the jobs table shows, from DOM mutations: proves updates arrived live.
WATCH = """() => {
  window.__seen = []; window.__noReload = true;
  const tb = document.querySelector('#jobs-table tbody');
  new MutationObserver(() => {
    for (const tr of tb.querySelectorAll('tr')) {
      const bar = tr.querySelector('.bar > div');
      window.__seen.push([tr.dataset.status, bar ? bar.style.width : '']);
    }
  }).observe(tb, {subtree: true, childList: true, attributes: true});
}"""


def _chart_points(page: Page, canvas_id: str) -> list[int]:
    """Data points per dataset of the Chart.js chart on canvas `canvas_id` ([] when no chart was drawn)."""
    counts: list[int] = page.evaluate(
        "(id) => { const c = Chart.getChart(id); return c ? c.data.datasets.map(d => d.data.length) : []; }",
        canvas_id)
    return counts


@pytest.mark.slow
def test_dashboard_end_to_end_in_chromium(tiny_onnx: Path, tmp_path: Path) -> None:
    assert CHROMIUM.is_file(), "Debian chromium is required: apt-get install -y chromium (CI must install it)"
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    srv = Proc(["serve", "--port", str(port)], service_env(data_dir=str(tmp_path / "data"), progress_interval_s="0.2"),
               tmp_path / "serve.log", tmp_path)
    errors: list[str] = []
    try:
        key = srv.wait_for(r"^(hwp_\S+)$", timeout=120).group(1)
        wait_http(f"{base}/healthz")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            # Key once, kept in sessionStorage; a wrong key is refused.
            page.goto(f"{base}/dashboard")
            expect(page.locator("#view-login")).to_be_visible()
            expect(page.locator("#nav")).to_be_hidden()
            page.fill("#key", "hwp_wrong_key")
            page.click("#login-form button")
            expect(page.locator("#login-error")).to_contain_text("not accepted")
            page.fill("#key", key)
            page.click("#login-form button")
            expect(page.locator("#view-jobs")).to_be_visible()
            assert any("401" in e for e in errors), "the refused key was a real 401 from the API"
            errors.clear()  # from here on, any browser error fails the test
            assert page.evaluate("sessionStorage.getItem('hwprune.apiKey')") == key
            assert key not in page.url

            # Upload a model and submit a job from the form.
            page.click("#nav a[data-view=submit]")
            page.set_input_files("#upload-file", str(tiny_onnx))
            page.click("#upload-form button[type=submit]")
            expect(page.locator("#upload-status")).to_contain_text("Uploaded", timeout=60_000)
            page.select_option("#f-method", "smart")
            page.select_option("#f-granularity", "channel")
            expect(page.locator("#custom-block")).to_be_hidden()
            page.select_option("#f-accel", "__custom")  # custom block shape: rows x cols inputs appear
            expect(page.locator("#f-block-r")).to_be_visible()
            page.select_option("#f-accel", "cpu")
            expect(page.locator("#custom-block")).to_be_hidden()
            page.fill("#f-target", "0.5")
            page.fill("#f-steps", "30")
            page.locator("#job-form details").evaluate("d => { d.open = true; }")
            page.fill("#f-extra", json.dumps({"batch_size": 8, "latency_seconds": 1.0}))
            page.screenshot(path=str(shots / "1-submit.png"), full_page=True)
            page.click("#job-form button[type=submit]")

            # Live: the row changes state without any reload.
            expect(page.locator("#view-jobs")).to_be_visible(timeout=30_000)
            row = page.locator("#jobs-table tbody tr").first
            expect(row).to_be_visible()
            page.evaluate(WATCH)
            job_id = row.get_attribute("data-id")
            assert job_id
            expect(row).to_have_attribute("data-status", "running", timeout=120_000)
            page.screenshot(path=str(shots / "2-jobs-running.png"), full_page=True)
            expect(row).to_have_attribute("data-status", "succeeded", timeout=300_000)
            assert page.evaluate("window.__noReload") is True, "the page reloaded: updates were not live"
            seen = page.evaluate("window.__seen")
            statuses = {s for s, _ in seen}
            widths = {w for s, w in seen if s == "running"}
            assert {"running", "succeeded"} <= statuses, seen
            assert any(w not in ("0%", "0.0%", "100.0%") for w in widths), f"no intermediate progress: {widths}"
            expect(row.locator(".badge")).to_have_text("succeeded")
            page.screenshot(path=str(shots / "3-jobs-done.png"), full_page=True)

            # Job page: numbers, explain text, every chart drawn from the report.
            row.locator("a").first.click()
            expect(page.locator("#job-results")).to_be_visible(timeout=60_000)
            expect(page.locator("#job-cards")).to_contain_text("ms")
            expect(page.locator("#job-cards")).to_contain_text("MACs")
            expect(page.locator("#job-fidelity")).to_contain_text("top-1 agreement")
            assert len(page.inner_text("#job-explain").strip()) > 20
            report = httpx.get(f"{base}/v1/jobs/{job_id}/artifacts/report.json",
                               headers={"Authorization": f"Bearer {key}"}).json()
            n_layers = len([lay for lay in report["layers"] if lay.get("sparsity") is not None])
            assert _chart_points(page, "chart-layers") == [n_layers] and n_layers > 0
            n_hist = len(report["training"]["history"])
            assert n_hist > 0 and _chart_points(page, "chart-training") == [n_hist, n_hist, n_hist]
            # A chart that drew something has non-background pixels on its canvas.
            painted = page.evaluate("""() => { const c = document.getElementById('chart-layers');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
            assert painted > 1000, f"layer chart canvas is blank ({painted} painted pixels)"
            page.screenshot(path=str(shots / "4-job.png"), full_page=True)

            # Download through the authenticated blob link: the same bytes the API serves, a loadable model.
            with page.expect_download() as dl:
                page.click("#dl-onnx")
            saved = tmp_path / "downloaded.onnx"
            dl.value.save_as(saved)
            api_bytes = httpx.get(f"{base}/v1/jobs/{job_id}/artifacts/model.onnx",
                                  headers={"Authorization": f"Bearer {key}"}).content
            assert saved.read_bytes() == api_bytes
            sess = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
            out = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 16, 16), np.float32)})
            assert out[0].shape == (1, 10)

            # A 3D job from the same form: its page plots the sampled configurations and the chosen point,
            # and has no SMART training curve. This time the job page itself follows the job live.
            page.click("#nav a[data-view=submit]")
            expect(page.locator("#f-model option")).to_have_count(1)
            page.select_option("#f-method", "3d")
            expect(page.locator("#f-target-kind")).to_have_value("flops")
            page.fill("#f-target", "0.5")
            page.fill("#f-steps", "4")
            page.locator("#job-form details").evaluate("d => { d.open = true; }")
            page.fill("#f-extra", json.dumps({"batch_size": 8, "latency_seconds": 0.5}))
            page.click("#job-form button[type=submit]")
            expect(page.locator("#jobs-table tbody tr")).to_have_count(2, timeout=30_000)
            row3d = page.locator("#jobs-table tbody tr").first
            job3d = row3d.get_attribute("data-id")
            assert job3d and job3d != job_id
            row3d.locator("a").first.click()
            expect(page.locator("#job-results")).to_be_visible(timeout=300_000)
            expect(page.locator("#job-badge")).to_contain_text("succeeded")
            r3d = httpx.get(f"{base}/v1/jobs/{job3d}/artifacts/report.json",
                            headers={"Authorization": f"Bearer {key}"}).json()
            assert _chart_points(page, "chart-3d") == [len(r3d["plan3d"]["samples"]), 1]
            assert page.locator("#card-training").is_hidden()
            page.screenshot(path=str(shots / "5-job-3d.png"), full_page=True)

            # Comparison view: both jobs are points at their measured pruned latency.
            model_id = httpx.get(f"{base}/v1/jobs/{job_id}",
                                 headers={"Authorization": f"Bearer {key}"}).json()["model_id"]
            page.goto(f"{base}/dashboard#/compare/{model_id}")
            page.select_option("#cmp-y", "top1")
            expect(page.locator("#cmp-table tbody tr")).to_have_count(2)
            expect(page.locator("#chart-compare")).to_have_attribute("data-points", "2")
            xs = page.evaluate("Chart.getChart('chart-compare').data.datasets[0].data.map(p => [p.id, p.x])")
            assert dict(xs) == pytest.approx({job_id: report["latency_ms"]["pruned"]["median"],
                                              job3d: r3d["latency_ms"]["pruned"]["median"]})
            page.screenshot(path=str(shots / "6-compare.png"), full_page=True)
            browser.close()
    finally:
        srv.stop()
    assert not errors, f"browser errors: {errors}"
    assert len(list(shots.glob("*.png"))) == 6
