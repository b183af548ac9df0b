# Subject-level vertebra ids across each subject's stations, and the published vertebra masks.


rule label_levels:
    """Per subject group (named after a batch): every station of its subjects, whichever batch holds it."""
    input:
        manifest=ancient(MANIFEST),
        restore=get_group_restore_folders,
        labeling=get_group_labeling_folders,
        provenance=rules.describe.output.provenance,
    output:
        report(
            directory(stage_dir("label-levels")),
            patterns=[layout.SNAPSHOT_PATTERN],
            caption="../report/snapshots.rst",
            category="QC snapshots",
            subcategory="{batch}",
        ),
    log:
        LOGS / "label_levels" / "{batch}.log",
    benchmark:
        BENCH / "label_levels" / "{batch}.tsv"
    threads: 1
    resources:
        mem_mb=memory_mb(2000),
        runtime=batch_minutes(0.1, images=images_in_group),
    params:
        members=get_group_members,
        derivatives=DERIVATIVES,
        whole_spine="--whole-spine" if config["whole_spine"] else "",
        labeling=LABEL_LEVELS_FLAGS,
    shell:
        "spinecohort label-levels --manifest {input.manifest} --batch {wildcards.batch}"
        " --restore {input.restore} --derivatives {params.derivatives} --provenance {input.provenance}"
        " {params.whole_spine} --labeling {input.labeling} {params.labeling} --out {output} &> {log}"


rule publish_derivative:
    """Relinks a derivative deleted from the BIDS tree (the work folder that made it keeps it)."""
    input:
        made=get_maker_folder_of,
    output:
        DERIVATIVES / "{subject_folder}" / layout.DERIVATIVE_NAME,
    log:
        LOGS
        / "publish_derivative"
        / "{subject_folder}"
        / "{image_id}_{seg}_{suffix}.log",
    localrule: True
    shell:
        "spinecohort publish {input.made} {output} &> {log}"
