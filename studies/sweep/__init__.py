"""Many runs: a study's design, its phases through Ray Tune (and hpo's TPE), cluster sizing, pre-flight checks and
the resume record, the frontier and its words, figures, tables, the report and the study command line."""
