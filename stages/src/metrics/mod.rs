//! Face-verification metrics: insightface's 10-fold accuracy, ROC, TPR at fixed FPR, AUC,
//! EER, IJB-style template pooling and the error-versus-reject curve (methods.md §6, §9).
