# Scores against the manifest's reference masks, and the cohort-wide summaries.


rule score:
    input:
        manifest=ancient(MANIFEST),
        restore=stage_dir("restore"),
        levels=get_batch_levels_folders,
    output:
        directory(stage_dir("score")),
    log:
        LOGS / "score" / "{batch}.log",
    benchmark:
        BENCH / "score" / "{batch}.tsv"
    threads: 1
    resources:
        mem_mb=memory_mb(2000),
        runtime=batch_minutes(0.05),
    params:
        members=get_batch_members,
        structures=shlex.quote(json.dumps(config["metrics"]["structures"])),
        assd=config["metrics"]["assd"],
    shell:
        "spinecohort score --manifest {input.manifest} --batch {wildcards.batch}"
        " --input {input.restore} --levels {input.levels}"
        " --structures {params.structures} --assd {params.assd} --out {output} &> {log}"


rule summarize:
    input:
        manifest=ancient(MANIFEST),
        scores=expand(stage_dir("score"), batch=get_batches()),
        levels=expand(stage_dir("label-levels"), batch=get_groups()),
        semantic=expand(stage_dir("average-folds"), batch=get_batches()),
        ledgers=get_ledger_folders,
        provenance=rules.describe.output.provenance,
        decisions=[config["qc"]["decisions"]] if config["qc"]["decisions"] else [],
    output:
        dataset=directory(RESULTS / "scores"),
        by_region=SUMMARY / "by_region.parquet",
        table_md=report(
            SUMMARY / "table_s1.md",
            caption="../report/table_s1.rst",
            category="Summary",
        ),
        table_csv=SUMMARY / "table_s1.csv",
        table_tex=SUMMARY / "table_s1.tex",
        levels_md=report(
            SUMMARY / "levels.md",
            caption="../report/levels.rst",
            category="Summary",
        ),
        levels_csv=SUMMARY / "levels.csv",
        subject_levels=report(
            SUMMARY / layout.SUBJECT_LEVELS,
            caption="../report/subject_levels.rst",
            category="Summary",
        ),
        qc=SUMMARY / layout.QC_TABLE,
        qc_flags=report(
            SUMMARY / layout.QC_FLAGS,
            caption="../report/qc_flags.rst",
            category="QC",
        ),
        qc_review=SUMMARY / layout.QC_REVIEW,
        morphometrics=SUMMARY / layout.MORPHOMETRICS_TABLE,
        stacks=SUMMARY / layout.STACKS,
        reviewed_out=SUMMARY / layout.REVIEWED_OUT,
        plots=report(
            expand(SUMMARY / "boxplot_{metric}.png", metric=["dsc", "assd"]),
            caption="../report/boxplots.rst",
            category="Summary",
        ),
        failures=report(
            SUMMARY / "failures.tsv",
            caption="../report/failures.rst",
            category="Failures",
        ),
    log:
        LOGS / "summarize.log",
    benchmark:
        BENCH / "summarize.tsv"
    threads: 1
    resources:
        mem_mb=memory_mb(4000),
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        ledgers=lambda wildcards, input: " ".join(
            str(Path(folder) / layout.LEDGER) for folder in input.ledgers
        ),
        structures=shlex.quote(json.dumps(list(config["metrics"]["structures"]))),
        folder=SUMMARY,
        review=config["qc"]["review_images"],
        mixed=config["mixed_stacks"],
        derivatives=DERIVATIVES,
        decisions=lambda wildcards, input: (
            f"--decisions {input.decisions}" if input.decisions else ""
        ),
    shell:
        "spinecohort summarize --manifest {input.manifest} --scores {input.scores} --levels {input.levels} --semantic {input.semantic}"
        " --ledgers {params.ledgers} --structures {params.structures} --review-images {params.review}"
        " --dataset {output.dataset} --provenance {input.provenance} --mixed-stacks {params.mixed} {params.decisions}"
        " --derivatives {params.derivatives}"
        " --out {params.folder} &> {log}"
