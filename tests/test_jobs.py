"""The job pool under answering, translation and evaluation (`sara_megatron.jobs`), against the
real local OpenAI-wire server: bounded concurrency as the server sees it, resume from the record
after a kill -9 without re-sending anything recorded, and each failure policy."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sara_megatron.chat.client import ChatClient, ChatRequestFailed, ChatSettings
from sara_megatron.chat.server import Fault, LocalChatServer
from sara_megatron.jobs import (
    Attempt, FailurePolicy, Halt, JobPool, JsonlRecord, PoolCounts, Rejected,
)

SETTINGS = ChatSettings(model="local", temperature=0.0)


def shout(body):
    """The model: the prompt in capitals."""
    return body["messages"][-1]["content"].upper()


def prompt_of(request):
    return request.body["messages"][-1]["content"]


def ask(client, prompt_of_job=lambda job: f"job {job}"):
    """A job's work: one request; the row it leaves in the record."""
    async def work(job, attempt: Attempt) -> dict:
        reply = await client.complete([{"role": "user", "content": prompt_of_job(job)}], SETTINGS)
        return {"job": job, "reply": reply.content}
    return work


def run_pool(server, pool, jobs, work_of=ask, client_concurrency=64, max_retries=0, **hooks):
    async def main():
        async with ChatClient(server.base_url, concurrency=client_concurrency,
                              max_retries=max_retries, backoff_base_s=0.01) as client:
            return await pool.run(jobs, work_of(client), **hooks)
    return asyncio.run(main())


@pytest.mark.parametrize("concurrency", [1, 3, 5])
def test_jobs_in_flight_are_bounded_as_the_server_sees_them(concurrency):
    seen = []
    with LocalChatServer(shout, latency_s=0.15) as server:
        report = run_pool(server, JobPool(concurrency, FailurePolicy.CONTINUE,
                                          progress=lambda c: seen.append(c.finished)),
                          range(12))
        peak = server.max_in_flight
        asked = sorted(prompt_of(r) for r in server.requests)
    # The client would allow 64 requests at once: the pool alone holds them to `concurrency`,
    # and with 12 jobs of 0.15 s each it reaches that bound.
    assert peak == concurrency
    assert asked == sorted(f"job {i}" for i in range(12))
    assert report.counts == PoolCounts(total=12, done=12)
    assert seen == list(range(1, 13))  # progress after every job


def test_a_bug_in_one_job_cancels_the_rest_and_a_rerun_sends_only_what_is_missing(tmp_path):
    path = tmp_path / "record.jsonl"

    def buggy(client):
        work = ask(client)

        async def run(job, attempt):
            if job == 6:
                await asyncio.sleep(0.3)
                raise KeyError("a bug")
            return await work(job, attempt)
        return run

    with LocalChatServer(shout, latency_s=0.1) as server:
        with JsonlRecord(path, key=lambda row: row["job"]) as record:
            pool = JobPool(2, FailurePolicy.CONTINUE, failures=(ChatRequestFailed,),
                           record=record, key=lambda job: job)
            with pytest.raises(KeyError):
                run_pool(server, pool, range(20), work_of=buggy)
        first = [prompt_of(r) for r in server.requests]
        recorded = {json.loads(line)["job"] for line in path.read_text().splitlines()}
        # The bug stopped the pool: far from all 20 were sent, and every reply that came back
        # before the cancellation is in the record.
        assert 3 <= len(recorded) < 15 and len(first) <= len(recorded) + 2
        time.sleep(0.3)
        assert len(server.requests) == len(first)  # nothing went on after the raise
        server.requests.clear()

        with JsonlRecord(path, key=lambda row: row["job"]) as record:
            assert set(record.load()) == recorded
            pool = JobPool(2, FailurePolicy.CONTINUE, record=record, key=lambda job: job)
            report = run_pool(server, pool, range(20))
        again = [prompt_of(r) for r in server.requests]
    assert sorted(again) == sorted(f"job {i}" for i in range(20) if i not in recorded)
    assert report.counts.skipped == len(recorded) and report.counts.done == 20 - len(recorded)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(row["job"] for row in rows) == list(range(20))
    assert all(row["reply"] == f"JOB {row['job']}" for row in rows)


WORKER = """
import asyncio, sys
from sara_megatron.chat.client import ChatClient, ChatSettings
from sara_megatron.jobs import FailurePolicy, JobPool, JsonlRecord

async def main(base_url, path):
    async with ChatClient(base_url, concurrency=64) as client:
        async def work(job, attempt):
            reply = await client.complete([{"role": "user", "content": f"job {job}"}],
                                          ChatSettings(model="local"))
            return {"job": job, "reply": reply.content}
        with JsonlRecord(path, key=lambda row: row["job"]) as record:
            record.load()
            await JobPool(3, FailurePolicy.CONTINUE, record=record,
                          key=lambda job: job).run(range(40), work)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.multiprocess
def test_kill_minus_9_then_resume_resends_nothing_recorded(tmp_path):
    path = tmp_path / "record.jsonl"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("OPENAI_API_KEY", None)
    with LocalChatServer(shout, latency_s=0.1) as server:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, server.base_url, str(path)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_text().count("\n") >= 8:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        time.sleep(0.3)  # replies the killed process could no longer read are recorded too
        killed_run = len(server.requests)
        with JsonlRecord(path, key=lambda row: row["job"]) as record:
            recorded = set(record.load())
            assert 8 <= len(recorded) < 40
            pool = JobPool(3, FailurePolicy.CONTINUE, record=record, key=lambda job: job)
            report = run_pool(server, pool, range(40))
        rerun = [prompt_of(r) for r in server.requests[killed_run:]]
    # Nothing the record held was asked again; what was in flight at the kill (at most 3) was.
    assert not set(rerun) & {f"job {i}" for i in recorded}
    assert sorted(rerun) == sorted(f"job {i}" for i in range(40) if i not in recorded)
    assert killed_run - len(recorded) <= 3
    assert report.counts.skipped == len(recorded)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(row["job"] for row in rows) == list(range(40))


def doomed_jobs(*jobs):
    prompts = {f"job {j}" for j in jobs}
    return lambda index, body: (Fault.server_error(500)
                                if body["messages"][-1]["content"] in prompts else None)


def test_continue_records_each_failure_and_goes_on(tmp_path):
    failed = []
    with LocalChatServer(shout, faults=doomed_jobs(2, 7)) as server:
        with JsonlRecord(tmp_path / "r.jsonl", key=lambda row: row["job"]) as record:
            pool = JobPool(3, FailurePolicy.CONTINUE, failures=(ChatRequestFailed,),
                           record=record, key=lambda job: job)
            report = run_pool(server, pool, range(10), max_retries=1, on_failure=failed.append)
        asked = [prompt_of(r) for r in server.requests]
    assert not report.halted and report.counts == PoolCounts(total=10, done=8, failed=2)
    assert sorted(f.job for f in report.failures) == [2, 7] and failed == report.failures
    assert {f.reason for f in report.failures} == {"server_error"}
    assert all(f.error.attempts == 2 and f.attempts == 1 for f in report.failures)
    # Every job was asked (the doomed ones twice: the client's own retry), and only the
    # answered ones are in the record, so a rerun asks the failed ones again.
    assert sorted(asked) == sorted([f"job {i}" for i in range(10)] + ["job 2", "job 7"])
    assert sorted(record.done) == [0, 1, 3, 4, 5, 6, 8, 9]


def test_stop_starts_no_job_after_the_first_failure():
    with LocalChatServer(shout, latency_s=0.1, faults=doomed_jobs(4)) as server:
        report = run_pool(server, JobPool(2, FailurePolicy.STOP, failures=(ChatRequestFailed,)),
                          range(20))
        asked = [prompt_of(r) for r in server.requests]
    assert report.halted and [f.job for f in report.failures] == [4]
    # Jobs 0..4 were started before the failure, job 5 at most beside it; nothing after.
    assert set(asked) <= {f"job {i}" for i in range(6)} and "job 4" in asked
    assert report.counts.done == len(asked) - 1


def test_retry_stricter_asks_again_with_the_rejection_until_the_attempts_run_out():
    def model(body):  # job 1 always loses its box; job 0 only until it is told
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("job 1") or prompt == "job 0":
            return "no box here"
        return "\\boxed{" + prompt + "}"

    def checked(client):
        async def work(job, attempt: Attempt):
            prompt = f"job {job}" + (f" (your last reply: {attempt.rejection}, attempt "
                                     f"{attempt.number})" if attempt.rejection else "")
            reply = await client.complete([{"role": "user", "content": prompt}], SETTINGS)
            if "\\boxed{" not in reply.content:
                raise Rejected("lost_boxed")
            return reply.content
        return work

    results = {}
    with LocalChatServer(model) as server:
        pool = JobPool(2, FailurePolicy.RETRY_STRICTER, failures=(ChatRequestFailed,),
                       max_attempts=3)
        report = run_pool(server, pool, range(4), work_of=checked,
                          on_result=results.__setitem__)
        asked = sorted(prompt_of(r) for r in server.requests)
    assert results == {0: "\\boxed{job 0 (your last reply: lost_boxed, attempt 1)}",
                       2: "\\boxed{job 2}", 3: "\\boxed{job 3}"}
    [failure] = report.failures
    assert (failure.job, failure.reason, failure.attempts) == (1, "lost_boxed", 3)
    assert asked == sorted(["job 0", "job 0 (your last reply: lost_boxed, attempt 1)", "job 1",
                            "job 1 (your last reply: lost_boxed, attempt 1)",
                            "job 1 (your last reply: lost_boxed, attempt 2)", "job 2", "job 3"])
    assert report.counts == PoolCounts(total=4, done=3, failed=1, retried=3)


def test_other_policies_do_not_retry_a_rejection():
    async def work(job, attempt):
        raise Rejected("wrong")

    report = asyncio.run(JobPool(2, FailurePolicy.CONTINUE, max_attempts=5).run(range(3), work))
    assert [(f.reason, f.attempts) for f in report.failures] == [("wrong", 1)] * 3


def test_halt_stops_the_pool_and_leaves_that_job_without_outcome():
    started, ended = [], []

    async def work(job, attempt):
        started.append(job)
        if job == 3:
            raise Halt
        await asyncio.sleep(0.05)
        return job

    report = asyncio.run(JobPool(2, FailurePolicy.CONTINUE).run(
        range(10), work, on_result=lambda job, result: ended.append(job)))
    assert report.halted and not report.failures
    assert 3 not in ended and max(started) <= 4 and set(ended) == set(started) - {3}


def test_pool_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="concurrency"):
        JobPool(0, FailurePolicy.STOP)
    with pytest.raises(ValueError, match="max_attempts"):
        JobPool(1, FailurePolicy.RETRY_STRICTER, max_attempts=0)
    with pytest.raises(ValueError, match="key"):
        JobPool(1, FailurePolicy.CONTINUE, record=JsonlRecord(tmp_path / "r", key=str))


def test_record_cuts_a_torn_line_and_checks_every_row(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"job": 0}\n{"job": 1}\n{"jo', encoding="utf-8")

    def check(p, line_no, row):
        if row["job"] == 1 and refuse:
            raise ValueError(f"{p}:{line_no}: refused")

    refuse = True
    with pytest.raises(ValueError, match=r"r\.jsonl:2: refused"):
        JsonlRecord(path, key=lambda row: row["job"], check=check).load()
    refuse = False
    with JsonlRecord(path, key=lambda row: row["job"], check=check, fields=("job",)) as record:
        assert sorted(record.load()) == [0, 1]
        record.append({"job": 2, "dropped": True})
    assert path.read_text(encoding="utf-8") == '{"job": 0}\n{"job": 1}\n{"job": 2}\n'
