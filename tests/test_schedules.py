"""Schedules: cron ticks in local time (DST nights included), catch-up, and the partition a tick names.

Pure arithmetic: times are fed in, nothing waits."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

import flowstone as fs

NEW_YORK = ZoneInfo("America/New_York")
UTC = timezone.utc


def local(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=NEW_YORK)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


# -------------------------------------------------------------- daylight saving


def test_a_time_repeated_by_the_fall_back_runs_once():
    """01:30 happens twice in New York on 2026-11-01; the schedule fires once."""
    nightly = fs.Schedule("report", "30 1 * * *", timezone="America/New_York")
    ticks = list(nightly.ticks(local(2026, 10, 31, 12), local(2026, 11, 2, 12)))
    assert ticks == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]  # 01:30 EDT, then 01:30 EST
    assert all(t.tzinfo is UTC for t in ticks)


def test_a_time_skipped_by_the_spring_forward_runs_right_after_the_gap():
    """02:30 does not exist in New York on 2026-03-08; the tick runs at 03:00 local."""
    nightly = fs.Schedule("report", "30 2 * * *", timezone="America/New_York")
    ticks = list(nightly.ticks(local(2026, 3, 7, 12), local(2026, 3, 9, 12)))
    assert ticks == [local(2026, 3, 8, 3, 0).astimezone(UTC), local(2026, 3, 9, 2, 30).astimezone(UTC)]


def test_an_hourly_schedule_runs_in_both_repeated_hours_and_a_23_hour_day_has_23_ticks():
    hourly = fs.Schedule("events", "0 * * * *", timezone="America/New_York")
    fall_back = list(hourly.ticks(local(2026, 11, 1, 0, 30), local(2026, 11, 1, 3, 30)))
    assert len(fall_back) == 4 and len(set(fall_back)) == 4  # 01:00 EDT, 01:00 EST, 02:00, 03:00
    assert [t - fall_back[0] for t in fall_back] == [timedelta(hours=h) for h in range(4)]
    spring = list(hourly.ticks(local(2026, 3, 8, 0, 0), local(2026, 3, 9, 0, 0)))
    assert len(spring) == 23


def test_ticks_are_after_the_start_and_up_to_the_end_included():
    daily = fs.Schedule("report", "0 6 * * *")
    assert list(daily.ticks(utc(2026, 1, 1, 6), utc(2026, 1, 3, 6))) == [utc(2026, 1, 2, 6), utc(2026, 1, 3, 6)]
    assert daily.next_tick(utc(2026, 1, 1, 6)) == utc(2026, 1, 2, 6)


# -------------------------------------------------------------------- catch-up


def test_catch_up_latest_runs_only_the_newest_missed_tick():
    daily = fs.Schedule("report", "0 6 * * *")
    assert daily.due(utc(2026, 1, 1, 6), utc(2026, 1, 5, 7)) == [utc(2026, 1, 5, 6)]
    assert daily.due(utc(2026, 1, 5, 6), utc(2026, 1, 5, 7)) == []  # nothing new since the last one handled


def test_catch_up_n_runs_the_last_n_missed_ticks_oldest_first():
    daily = fs.Schedule("report", "0 6 * * *", catch_up=3)
    assert daily.due(utc(2026, 1, 1, 6), utc(2026, 1, 10, 7)) == [
        utc(2026, 1, 8, 6), utc(2026, 1, 9, 6), utc(2026, 1, 10, 6)]
    assert daily.due(utc(2026, 1, 8, 6), utc(2026, 1, 9, 7)) == [utc(2026, 1, 9, 6)]


def test_catch_up_skip_runs_a_tick_on_time_and_drops_the_missed_ones():
    daily = fs.Schedule("report", "0 6 * * *", catch_up="skip")
    assert daily.due(utc(2026, 1, 1, 6), utc(2026, 1, 5, 6, 0, 30)) == [utc(2026, 1, 5, 6)]  # noticed 30 s late
    assert daily.due(utc(2026, 1, 1, 6), utc(2026, 1, 5, 7)) == []  # an hour late: missed, dropped


# ----------------------------------------------------------- which partition


def test_a_tick_of_a_daily_asset_names_the_last_complete_local_day():
    days = fs.DailyPartitions(start=date(2026, 1, 1), timezone="America/New_York")
    morning = fs.Schedule("events", "0 6 * * *", timezone="America/New_York")
    assert morning.partition_at(days, local(2026, 3, 8, 6)) == date(2026, 3, 7)
    # 01:00 UTC on the 9th is still the 8th in New York: the 7th is the last complete day there.
    assert morning.partition_at(days, utc(2026, 3, 9, 1)) == date(2026, 3, 7)
    assert morning.partition_at(None, utc(2026, 3, 9, 1)) is None


def test_a_tick_of_an_hourly_asset_names_the_hour_that_just_ended():
    hours = fs.HourlyPartitions(start=datetime(2026, 1, 1, tzinfo=UTC))
    every = fs.Schedule("events", "5 * * * *")
    assert every.partition_at(hours, utc(2026, 1, 2, 10, 5)) == utc(2026, 1, 2, 9)  # 10:00-11:00 is under way
    on_the_hour = fs.Schedule("events", "0 * * * *")
    assert on_the_hour.partition_at(hours, utc(2026, 1, 2, 10)) == utc(2026, 1, 2, 9)
    kolkata = fs.HourlyPartitions(start=datetime(2026, 1, 1, tzinfo=UTC) - timedelta(minutes=30),
                                  timezone="Asia/Kolkata")  # local hours start at :30 UTC
    assert every.partition_at(kolkata, utc(2026, 1, 2, 10, 5)) == utc(2026, 1, 2, 8, 30)


# ------------------------------------------------------------------ definitions


@pytest.mark.parametrize(("fields", "field"), [
    ({"asset": "report", "cron": "61 * * * *"}, "cron"),
    ({"asset": "report", "cron": ""}, "cron"),
    ({"asset": "report", "cron": "0 6 * * *", "timezone": "Mars/Olympus"}, "timezone"),
    ({"asset": "report", "cron": "0 6 * * *", "catch_up": "all"}, "catch_up"),
    ({"asset": "report", "cron": "0 6 * * *", "catch_up": 0}, "catch_up"),
    ({"asset": "drop table x;", "cron": "0 6 * * *"}, "asset"),
])
def test_a_bad_schedule_is_refused_naming_the_field(fields, field):
    with pytest.raises(fs.DefinitionError) as error:
        fs.Schedule(**fields)
    assert [e.field for e in error.value.errors] == [field]


def test_a_pipeline_checks_its_schedules_with_its_assets():
    pipeline = fs.Pipeline("p")

    @pipeline.asset(partitioned_by=fs.StaticPartitions(["eu", "us"]))
    async def regions(ctx, deps):
        return 1

    @pipeline.asset
    async def report(ctx, deps):
        return 1

    pipeline.schedule("report", "0 6 * * *", timezone="Europe/Lisbon")
    assert [s.name for s in pipeline.schedules] == ["report 0 6 * * * Europe/Lisbon"]
    pipeline.validate()
    pipeline.schedule("nothing", "0 6 * * *")
    pipeline.schedule("regions", "0 6 * * *")
    pipeline.add_schedule(fs.Schedule("report", "0 7 * * *", name="report 0 6 * * * Europe/Lisbon"))
    with pytest.raises(fs.DefinitionError) as error:
        pipeline.validate()
    messages = " | ".join(e.message for e in error.value.errors)
    assert "unknown asset 'nothing'" in messages and "StaticPartitions" in messages and "two schedules" in messages
    with pytest.raises(fs.DefinitionError):
        fs.Pipeline("q", schedules=["0 6 * * *"])
