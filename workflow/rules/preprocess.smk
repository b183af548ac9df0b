rule bias_correct:
    input:
        manifest=ancient(MANIFEST),
    output:
        directory(stage_dir("bias-correct")),
    log:
        LOGS / "bias_correct" / "{batch}.log",
    benchmark:
        BENCH / "bias_correct" / "{batch}.tsv"
    threads: 2
    resources:
        mem_mb=memory_mb(3000),
        runtime=batch_minutes(0.5),
    params:
        members=get_batch_members,
        shrink=" ".join(map(str, config["n4"]["shrink"])),
        iterations=" ".join(map(str, config["n4"]["iterations"])),
        fwhm=config["n4"]["bias_fwhm"],
        max_voxels=config["max_voxels"],
    shell:
        "spinecohort bias-correct --manifest {input.manifest} --batch {wildcards.batch}"
        " --out {output} --threads {threads} --shrink {params.shrink}"
        " --iterations {params.iterations} --bias-fwhm {params.fwhm}"
        " --max-voxels {params.max_voxels} &> {log}"


rule resample:
    input:
        manifest=ancient(MANIFEST),
        n4=stage_dir("bias-correct"),
        model=get_model_file("inference_config.json"),
    output:
        directory(stage_dir("resample")),
    log:
        LOGS / "resample" / "{batch}.log",
    benchmark:
        BENCH / "resample" / "{batch}.tsv"
    threads: 1
    resources:
        mem_mb=memory_mb(2000),
        runtime=batch_minutes(0.1),
    shell:
        "spinecohort resample --manifest {input.manifest} --batch {wildcards.batch}"
        " --input {input.n4} --model {input.model} --out {output} &> {log}"
