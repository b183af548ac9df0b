# spinecohort: SPINEPS reprocessing of a sagittal T2w spine cohort, batch by batch.
from snakemake.utils import min_version, validate

min_version("9.14.1")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/provenance.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/semantic.smk"
include: "workflow/rules/instance.smk"
include: "workflow/rules/levels.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/train.smk"


rule all:
    input:
        get_final_output,
