"""The page's API through FastAPI's TestClient: recipes and form fields, every problem of a launch request at
once with the CLI's messages, the bad input of a page (tabs, paths outside, `../`, a taken output directory, an
oversize upload), the token, and one real tiny run from launch to the comparison table."""

from __future__ import annotations

import time

import pytest
import yaml
from ui_helpers import UPLOAD_CAP, make_lm_adapter, make_workdir, page_settings, tiny_recipe

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture
def workdir(tmp_path, tiny_classifier_dir, monkeypatch):
    monkeypatch.chdir(make_workdir(tmp_path / "work", tiny_classifier_dir))
    return tmp_path / "work"


@pytest.fixture
def settings(workdir):
    return page_settings(workdir)


@pytest.fixture
def client(settings):
    from fastapi.testclient import TestClient

    from lorakit.ui import create_app

    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        yield c
    for name in app.state.launcher.running():  # a test that failed half-way leaves no training behind
        app.state.launcher.stop(name)


def launch(client, name: str, **body):
    return client.post("/api/runs", json={"recipe": "tiny.yaml", "name": name} | body)


def wait_for(client, name: str, until, seconds: float = 60.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run = client.get(f"/api/runs/{name}").json()
        if until(run):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {name} never reached the state; last: {run}")


def test_info_lists_the_recipes_and_the_form_keys(client):
    info = client.get("/api/info").json()
    assert info["recipes"] == ["tiny.yaml"]
    assert "lora.rank" in info["form_keys"] and info["max_upload_bytes"] == UPLOAD_CAP


def test_a_recipe_fills_the_form_with_its_values(client):
    fields = client.get("/api/recipe", params={"name": "tiny.yaml"}).json()["fields"]
    assert fields["lora.rank"] == "4" and fields["model.name"] == "tiny-bert"
    assert fields["lora.targets"] == "[query, value]"


def test_a_good_request_checks_clean_and_names_its_output_directory(client):
    response = client.post("/api/check", json={"recipe": "tiny.yaml", "name": "a"})
    assert response.status_code == 200 and response.json()["out_dir"] == "runs/a"


def test_every_problem_is_reported_at_once_with_the_clis_messages(client):
    response = client.post("/api/check", json={"recipe": "tiny.yaml", "name": "a",
                                               "fields": {"lora.rank": "0", "optim.lr": "fast"}})
    errors = response.json()["errors"]
    assert response.status_code == 422 and len(errors) == 2
    assert any("flag --lora.rank=0" in e and "rank" in e for e in errors)
    assert any("flag --optim.lr=fast" in e for e in errors)


def test_a_yaml_with_tabs_is_refused_naming_the_file_and_line(client):
    text = yaml.safe_dump(tiny_recipe()).replace("  rank: 4", "\trank: 4")
    response = client.post("/api/check", json={"yaml": text, "filename": "mine.yaml", "name": "a"})
    errors = response.json()["errors"]
    assert response.status_code == 422
    assert any(e.startswith("mine.yaml is not valid YAML at line") and "\\t" in e for e in errors), errors


def test_a_data_path_outside_the_working_directory_is_refused(client, tmp_path):
    outside = tmp_path / "elsewhere.tsv"
    outside.write_text("sentence\tlabel\nfine\t1\n")
    response = client.post("/api/check", json={"recipe": "tiny.yaml", "name": "a",
                                               "fields": {"data.train": str(outside)}})
    assert response.status_code == 422
    assert any("data.train" in e and "outside the directories" in e for e in response.json()["errors"])


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ""])
def test_a_run_name_that_is_not_one_directory_name_is_refused(client, workdir, name):
    response = launch(client, name)
    assert response.status_code == 422 and "run name" in response.json()["errors"][0]
    assert not (workdir.parent / "escape").exists()


def test_an_oversize_upload_is_refused_by_its_size(client):
    response = client.post("/api/check", json={"yaml": "#" * (UPLOAD_CAP + 1), "name": "a"})
    assert response.status_code == 413
    assert f"at most {UPLOAD_CAP:,} bytes" in response.json()["errors"][0]


def test_a_request_without_the_token_is_refused(settings):
    from fastapi.testclient import TestClient

    from lorakit.ui import create_app

    settings.token = "s3cret"
    with TestClient(create_app(settings), base_url="http://127.0.0.1:7860") as c:
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/").status_code == 200  # the page itself holds nothing secret


def test_another_host_name_is_refused_so_a_rebound_web_page_cannot_reach_the_api(client):
    assert client.get("/api/info", headers={"Host": "evil.example:7860"}).status_code == 421
    assert client.get("/api/info", headers={"Host": "localhost:7860"}).status_code == 200


def test_a_post_that_is_not_json_is_refused_so_a_cross_site_form_cannot_launch(client, workdir):
    response = client.post("/api/runs", content='{"recipe": "tiny.yaml", "name": "x"}',
                           headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and not (workdir / "runs" / "x").exists()


def test_a_missing_data_file_is_reported_before_the_launch(client, workdir):
    response = client.post("/api/check", json={"recipe": "tiny.yaml", "name": "a",
                                               "fields": {"data.eval": "data/nothing.tsv"}})
    assert response.status_code == 422 and "data/nothing.tsv" in response.json()["errors"][0]


def test_a_figure_outside_the_runs_directory_is_not_served(client, workdir):
    (workdir / "secret.png").write_bytes(b"x")
    assert client.get("/api/file", params={"path": "secret.png"}).status_code == 400
    assert client.get("/api/file", params={"path": "runs/../../etc/passwd"}).status_code == 400


def test_a_run_trains_to_the_table_and_a_second_into_its_directory_is_refused(client, workdir):
    started = launch(client, "first")
    assert started.status_code == 200, started.json()
    assert started.json()["command"].startswith("lorakit train recipes/tiny.yaml")
    run = wait_for(client, "first", lambda r: r["status"] != "running")
    assert run["status"] == "finished", run
    assert run["train"] and run["train"][-1]["step"] == 6 and run["metric"] == "accuracy"
    row = next(r for r in client.get("/api/runs").json()["runs"] if r["name"] == "first")
    assert row["value"] is not None and 0 < row["trainable_share"] < 1 and row["rank"] == 4
    again = launch(client, "first")
    assert again.status_code == 422 and "already holds a run" in again.json()["errors"][0]


def test_a_run_the_page_did_not_start_or_that_runs_is_not_resumed(client, settings):
    (settings.runs_dir / "cli").mkdir(parents=True)
    (settings.runs_dir / "cli" / "config.json").write_text("{}")
    response = client.post("/api/runs/cli/resume", json={})
    assert response.status_code == 400 and "--resume" in response.json()["errors"][0]
    assert launch(client, "busy", fields={"optim.max_steps": "100000"}).status_code == 200
    response = client.post("/api/runs/busy/resume", json={})
    assert response.status_code == 400 and "stop it before resuming" in response.json()["errors"][0]
    client.post("/api/runs/busy/stop", json={})


def test_a_running_run_stops_then_resumes_from_its_checkpoint(client):
    recipe = tiny_recipe(max_steps=100000)
    recipe["run"]["save_every"] = 3
    assert launch(client, "again", recipe=None, yaml=yaml.safe_dump(recipe), filename="long.yaml").status_code == 200
    taken = launch(client, "again")
    assert taken.status_code == 422 and "two runs cannot share" in taken.json()["errors"][0]
    wait_for(client, "again", lambda r: r["step"] >= 8)
    client.post("/api/runs/again/stop", json={})
    stopped = wait_for(client, "again", lambda r: r["status"] == "stopped")["step"]
    resumed = client.post("/api/runs/again/resume", json={})
    assert resumed.status_code == 200 and resumed.json()["argv"][-1] != "--resume"  # the record keeps the launch
    run = wait_for(client, "again", lambda r: r["status"] == "running" and r["step"] > stopped + 2)
    client.post("/api/runs/again/stop", json={})
    steps = [r["step"] for r in run["train"]]
    assert steps == sorted(set(steps)) and steps[0] == 1  # continued from a checkpoint, not started over


def test_a_failed_run_shows_the_clis_one_line_error(client, workdir):
    (workdir / "data" / "train.tsv").write_text("sentence\tlabel\n")  # no rows: training refuses
    assert launch(client, "empty").status_code == 200
    run = wait_for(client, "empty", lambda r: r["status"] != "running")
    assert run["status"] == "failed" and run["error"].startswith("error: "), run


def test_base_and_adapter_answer_the_same_prompt_differently(client, settings, workdir):
    make_lm_adapter(workdir, settings.runs_dir)
    assert client.get("/api/adapters").json()["adapters"] == ["lm"]
    response = client.post("/api/generate", json={"prompt": "hello", "adapters": ["lm"], "max_new_tokens": 8})
    answers = response.json()["answers"]
    assert [a["label"] for a in answers] == ["base (tiny-llama)", "lm"]
    assert answers[0]["text"] != answers[1]["text"] and all(a["text"] for a in answers)


def test_an_adapter_that_is_not_a_finished_run_is_refused(client):
    response = client.post("/api/generate", json={"prompt": "hello", "adapters": ["../lm"]})
    assert response.status_code == 400 and "run name" in response.json()["errors"][0]
    response = client.post("/api/generate", json={"prompt": "hello", "adapters": ["nothing"]})
    assert response.status_code == 400 and "has no adapter" in response.json()["errors"][0]
