# Prints the reference figures (mitotic_figures_reference.out) that tests/pipeline/test_clustered_statistics.py
# checks the clustered paired test against, on tests/data/mitotic_figures_scanner_a.csv, with two implementations this project does not contain:
#   * doAUCcluster.R of DIDSR/mitoticFigureCounts (R/doAUCcluster.R), the Cleveland Clinic QHS program for
#     Obuchowski (1997) clustered ROC data (https://www.lerner.ccf.org/qhs/software/lib/funcs_clusteredROC.R),
#     saved beside this script;
#   * pROC (Debian: apt-get install r-cran-proc), DeLong's test for the one-cell-per-cluster case.
# Run from tests/data: Rscript mitotic_figures_reference.R > mitotic_figures_reference.out
source("doAUCcluster.R")
suppressMessages(library(pROC))
d <- read.csv("mitotic_figures_scanner_a.csv")
for (pair in list(c(1, 2), c(1, 3), c(3, 5))) {
  a <- d[[paste0("observer_", pair[1])]]
  b <- d[[paste0("observer_", pair[2])]]
  for (cluster in c("roi", "target_id")) {
    r <- doAUCcluster(a, b, response = d$truth, clusterID = d[[cluster]])
    cat(sprintf("QHS  observers %d vs %d by %s: auc %.17g %.17g var %.17g %.17g var_diff %.17g p %.17g\n",
                pair[1], pair[2], cluster, r$auc.A, r$auc.B, r$auc.var.A, r$auc.var.B, r$auc.var.AminusB, r$p.value))
  }
  r1 <- roc(d$truth, a, levels = c(0, 1), direction = "<", quiet = TRUE)
  r2 <- roc(d$truth, b, levels = c(0, 1), direction = "<", quiet = TRUE)
  t <- roc.test(r1, r2, method = "delong", paired = TRUE)
  cat(sprintf("pROC observers %d vs %d by cell: var %.17g %.17g z %.17g p %.17g\n",
              pair[1], pair[2], var(r1, method = "delong"), var(r2, method = "delong"), t$statistic, t$p.value))
}
cat(R.version.string, "pROC", as.character(packageVersion("pROC")), "\n")
